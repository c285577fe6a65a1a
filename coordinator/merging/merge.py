"""``merge_experts``: from expert checkpoints on disk to a published, signed base, offline.

1. load and verify the experts (same base model, same adapted modules);
2. load the base in fp32; with ``eval_domains``, evaluate the base and every expert;
3. rank the experts (:mod:`.ranking`: Borda / Bradley–Terry over domains with bootstrap confidence,
   and the cheap ranking from training losses and delta statistics, with their Kendall tau);
   choose the weights: ``--weights``, else from the ranking (:func:`.weights.confident_weights`),
   else equal; experts with weight 0 are left out;
4. stream the experts' dense deltas module by module through the merge method and add the result to
   the base weights;
5. evaluate the merge, then publish checkpoint + signed manifest (:mod:`.publish`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cogen import models
from cogen.config import MergeConfig
from cogen.coordinator.merging import dare, linear, ties  # noqa: F401 - register the built-in methods
from cogen.coordinator.merging.evaluate import BlockLosses, domain_blocks, evaluate_blocks, losses
from cogen.coordinator.merging.experts import Expert, iter_deltas, load_experts
from cogen.coordinator.merging.manifest import Identity
from cogen.coordinator.merging.publish import newest_generation, parent_info, publish
from cogen.coordinator.merging.ranking import attach_cheap, cheap_ranking, delta_statistics, rank_experts
from cogen.coordinator.merging.registry import MergeError, MergeMethod, MergeParams, create
from cogen.coordinator.merging.weights import confident_weights, format_matrix, format_ranking, ranking
from cogen.protocols.manifest import EvalMatrix, ExpertEntry, Manifest, ParentInfo
from cogen.protocols.ranking import Ranking

logger = logging.getLogger(__name__)

IDENTITY_FILE = "coordinator-identity.pem"


def load_base_fp32(path: str, device: torch.device) -> nn.Module:
    """The base model in fp32 with frozen weights, its config as saved (``use_cache`` untouched)."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, device_map={"": str(device)}
            )
    except (OSError, ValueError) as e:
        raise models.ModelError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model


def choose_weights(
    cfg: MergeConfig, experts: list[Expert], ranked: Ranking | None
) -> tuple[list[float], str]:
    """Per-expert weights and where they came from: ``flags``, ``evaluation`` or ``equal``."""
    if cfg.weights:
        if len(cfg.weights) != len(experts):
            raise MergeError(f"--weights has {len(cfg.weights)} values for {len(experts)} experts")
        return list(cfg.weights), "flags"
    if ranked is not None:
        by_label = confident_weights(ranked)
        return [by_label[e.label] for e in experts], "evaluation"
    return [1.0] * len(experts), "equal"


def rank(cfg: MergeConfig, experts: list[Expert], losses: BlockLosses) -> Ranking:
    """The full ranking from the evaluation, with the cheap one (training losses, delta statistics)."""
    ranked = rank_experts(losses.base, losses.experts, bootstrap=cfg.rank_bootstrap, seed=cfg.seed)
    training = {
        e.label: (e.metadata.first_loss, e.metadata.train_loss)
        if e.metadata.first_loss is not None and e.metadata.train_loss is not None
        else None
        for e in experts
    }
    ranked = attach_cheap(ranked, cheap_ranking(training, delta_statistics(experts)))
    print(format_ranking(ranked), flush=True)
    return ranked


def merge_into(model: nn.Module, experts: list[Expert], weights: list[float], method: MergeMethod) -> None:
    """Add the merged delta of every adapted module to ``model``'s weights, one module at a time."""
    modules = experts[0].modules
    w = torch.tensor(weights, dtype=torch.float32)
    for module, deltas in tqdm(iter_deltas(experts), total=len(modules), desc="merging", disable=None):
        try:
            param = model.get_parameter(f"{module}.weight")
        except AttributeError:
            raise MergeError(
                f"the base model has no {module}.weight; were the experts trained on it?"
            ) from None
        if param.shape != deltas[0].shape:
            raise MergeError(
                f"{module}: the experts' delta has shape {tuple(deltas[0].shape)}, the base weight "
                f"{tuple(param.shape)}; were the experts trained on this base?"
            )
        merged = method.merge(
            module, param.detach(), [d.to(param.device) for d in deltas], w.to(param.device)
        )
        if not torch.isfinite(merged).all():
            raise MergeError(f"{module}: the merged delta holds NaN or Inf; nothing was published")
        with torch.no_grad():
            param.add_(merged.to(param.dtype))


def merge_experts(cfg: MergeConfig) -> Path:
    """Merge ``cfg.experts`` into their base with ``cfg.method`` and publish it; returns its directory."""
    started = time.monotonic()
    method = create(
        cfg.method, MergeParams(density=cfg.density, seed=cfg.seed, majority_sign=cfg.majority_sign)
    )
    experts = load_experts(cfg.experts)
    base_name = cfg.model or experts[0].metadata.base_model
    if cfg.model and cfg.model != experts[0].metadata.base_model:
        logger.warning(
            "merging into %s; the experts were trained on %s", cfg.model, experts[0].metadata.base_model
        )
    identity = Identity.load_or_create(cfg.identity or models.cache_root(cfg.cache_dir) / IDENTITY_FILE)
    path = models.resolve_model(base_name, cfg.cache_dir)
    parent_generation, parent_files, parent_manifest = parent_info(path)
    generation = cfg.generation or max(parent_generation, newest_generation(cfg.out)) + 1
    device = models.resolve_device(cfg.device)
    logger.info(
        "merging %d experts (%s) into %s with %s", len(experts), ", ".join(e.label for e in experts),
        base_name, cfg.method,
    )  # fmt: skip
    model = load_base_fp32(path, device)
    tokenizer = models.load_tokenizer(path)
    matrix: EvalMatrix | None = None
    ranked: Ranking | None = None
    blocks: dict[str, torch.Tensor] = {}
    if cfg.eval_domains:
        blocks = domain_blocks(cfg.eval_domains, tokenizer, cfg.eval_block_size, cfg.eval_blocks)
        model, matrix, per_block = evaluate_blocks(model, experts, blocks)
        ranked = rank(cfg, experts, per_block)
    weights, source = choose_weights(cfg, experts, ranked)
    kept = [(e, w) for e, w in zip(experts, weights, strict=True) if w > 0 and math.isfinite(w)]
    for expert, weight in zip(experts, weights, strict=True):
        if weight <= 0:
            logger.info("leaving out %s (weight 0 from %s)", expert.label, source)
    if not kept:
        raise MergeError(f"every expert has weight 0 (from {source}); nothing to merge")
    merge_into(model, [e for e, _ in kept], [w for _, w in kept], method)
    if matrix is not None:
        matrix = matrix.model_copy(update={"merged": losses(model, blocks)})
        print(format_matrix(matrix), flush=True)
    manifest = Manifest(
        generation=generation,
        parent=ParentInfo(
            model=base_name, generation=parent_generation, files=parent_files, manifest_sha256=parent_manifest
        ),
        experts=[_entry(e, w) for e, w in zip(experts, weights, strict=True)],
        method=cfg.method,
        params=method.describe(),
        weight_source=source,
        evaluation=matrix,
        ranking=ranking(matrix) if matrix is not None else {},
        rankings=ranked,
        files={},
    )
    final = publish(model, tokenizer, cfg.out, manifest, identity)
    print(
        f"published generation {generation} ({cfg.method}, {len(kept)} of {len(experts)} experts) at {final} "
        f"in {time.monotonic() - started:.1f} s",
        flush=True,
    )
    return final


def _entry(expert: Expert, weight: float) -> ExpertEntry:
    meta = expert.metadata
    return ExpertEntry(
        name=expert.label, expert=meta.expert, sha256=expert.sha256, weight=weight, steps=meta.steps,
        tokens=meta.tokens,
    )  # fmt: skip
