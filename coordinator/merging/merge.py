"""``merge_experts``: from expert checkpoints on disk to a published, signed base, offline.

1. load and verify the experts (same base model, same adapted modules);
2. load the base in fp32; with ``eval_domains``, evaluate the base and every expert;
3. rank the experts (:mod:`.ranking`: Borda / Bradley–Terry over domains with bootstrap confidence,
   and the cheap ranking from training losses and delta statistics, with their Kendall tau);
   choose the weights: ``--weights``, else from the ranking (:func:`.weights.confident_weights`),
   else equal; experts with weight 0 are left out;
4. stream the experts' dense deltas module by module through the merge method and add the result to
   the base weights;
5. with an evaluation, the publishing gate (:mod:`.gating`): the candidate is published only when it
   is not worse than its parent on any evaluated domain or on general text no expert trains on; else
   the harmful expert is left out or the delta halved, and with no candidate left nothing is published
   (:class:`.gating.GateRefused`);
6. evaluate the merge, then publish checkpoint + signed manifest (:mod:`.publish`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogen.coordinator.config import MergeConfig
from cogen.coordinator.merging import (  # noqa: F401 - register the built-in methods
    dare,
    linear,
    moe,  # the routed mixture (not a registered weight-merge method)
    ties,
)
from cogen.coordinator.merging.apply import merge_into, untie_output  # noqa: F401 - re-exported
from cogen.coordinator.merging.evaluate import BlockLosses, block_losses, domain_blocks, losses
from cogen.coordinator.merging.experts import Expert, load_experts
from cogen.coordinator.merging.fusion.fuse import FUSE, fusion_for
from cogen.coordinator.merging.gating import Build, Candidate, GateOptions, gated_merge
from cogen.coordinator.merging.manifest import signing_identity
from cogen.coordinator.merging.prequential import cheap_weights
from cogen.coordinator.merging.publish import newest_generation, parent_info, publish
from cogen.coordinator.merging.ranking import attach_cheap, cheap_ranking, delta_statistics, rank_experts
from cogen.coordinator.merging.registry import MergeError, MergeMethod, MergeParams, create
from cogen.coordinator.merging.reproduce import reproduction
from cogen.coordinator.merging.routed import best_model, build_routed
from cogen.coordinator.merging.screening import Screening, screen
from cogen.coordinator.merging.weights import confident_weights, format_matrix, format_ranking, ranking
from cogen.core import models
from cogen.core.corpora import known_domains
from cogen.protocols.gate import GateReport
from cogen.protocols.manifest import EvalMatrix, ExpertEntry, Manifest, ParentInfo
from cogen.protocols.ranking import Ranking

logger = logging.getLogger(__name__)

MIXTURE_DIR = "mixture"  #: the routed mixture's directory inside a published generation


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
    cfg: MergeConfig, experts: list[Expert], ranked: Ranking | None, screened: Screening | None = None
) -> tuple[list[float], str]:
    """Per-expert weights and where they came from: ``flags``, ``prequential`` (the cheap ranking, when it
    weighs some expert), ``evaluation`` or ``equal``; an expert whose claims failed a spot-check weighs 0."""
    weights, source = _weights(cfg, experts, ranked, screened)
    excluded = screened.excluded() if screened is not None else set()
    return [0.0 if e.label in excluded else w for e, w in zip(experts, weights, strict=True)], source


def _weights(
    cfg: MergeConfig, experts: list[Expert], ranked: Ranking | None, screened: Screening | None
) -> tuple[list[float], str]:
    if cfg.weights:
        if len(cfg.weights) != len(experts):
            raise MergeError(f"--weights has {len(cfg.weights)} values for {len(experts)} experts")
        return list(cfg.weights), "flags"
    if screened is not None and screened.cheap is not None and (screened.weighs() or ranked is None):
        cheap = cheap_weights(screened.cheap)
        if any(cheap.values()):
            return [cheap[e.label] for e in experts], "prequential"
    if ranked is not None:
        by_label = confident_weights(ranked)
        return [by_label[e.label] for e in experts], "evaluation"
    return [1.0] * len(experts), "equal"


def rank(cfg: MergeConfig, experts: list[Expert], losses: BlockLosses) -> Ranking:
    """The full ranking from the evaluation, with the cheap one (training losses, delta statistics)."""
    ranked = rank_experts(
        losses.base, losses.experts, bootstrap=cfg.merge.rank_bootstrap, seed=cfg.merge.seed
    )
    training = {
        e.label: (e.metadata.first_loss, e.metadata.train_loss)
        if e.metadata.first_loss is not None and e.metadata.train_loss is not None
        else None
        for e in experts
    }
    ranked = attach_cheap(ranked, cheap_ranking(training, delta_statistics(experts)))
    logger.info("ranking of the experts:\n%s", format_ranking(ranked))
    return ranked


def merge_experts(cfg: MergeConfig) -> Path:
    """Merge ``cfg.experts`` into their base with ``cfg.merge.method``, publish it; returns its directory."""
    started = time.monotonic()
    options = cfg.merge
    fusing = options.method == FUSE  # the experts merged linearly, then the student trained on them
    method = create(
        "linear" if fusing else options.method,
        MergeParams(density=options.density, seed=options.seed, majority_sign=options.majority_sign),
    )
    experts = load_experts(cfg.experts)
    base_name = cfg.model or experts[0].metadata.base_model
    if cfg.model and cfg.model != experts[0].metadata.base_model:
        logger.warning(
            "merging into %s; the experts were trained on %s", cfg.model, experts[0].metadata.base_model
        )
    identity = signing_identity(cfg.keys, cfg.cache)
    path = models.resolve_model(base_name, cfg.cache.cache_dir)
    parent_generation, parent_files, parent_manifest = parent_info(path)
    generation = cfg.generation or max(parent_generation, newest_generation(cfg.out)) + 1
    device = models.resolve_device(cfg.device)
    logger.info(
        "merging %d experts (%s) into %s with %s", len(experts), ", ".join(e.label for e in experts),
        base_name, options.method,
    )  # fmt: skip
    model = load_base_fp32(path, device)
    tokenizer = models.load_tokenizer(path)
    matrix: EvalMatrix | None = None
    ranked: Ranking | None = None
    blocks: dict[str, torch.Tensor] = {}
    if cfg.eval_domains:
        blocks = domain_blocks(cfg.eval_domains, tokenizer, cfg.eval.eval_block_size, cfg.eval.eval_blocks)
    screened = screen(cfg, model, experts, tokenizer, blocks, generation)
    model, matrix = screened.model, screened.matrix
    if screened.per_block is not None:
        ranked = rank(cfg, experts, screened.per_block)
    agreed = screened.agreement_with(ranked.order) if screened.agreement_with and ranked else None
    weights, source = choose_weights(cfg, experts, ranked, screened)
    kept = [(e, w) for e, w in zip(experts, weights, strict=True) if w > 0 and math.isfinite(w)]
    for expert, weight in zip(experts, weights, strict=True):
        if weight <= 0:
            logger.info("leaving out %s (weight 0 from %s)", expert.label, source)
    if not kept:
        raise MergeError(f"every expert has weight 0 (from {source}); nothing to merge")
    mixture = None
    if cfg.moe.mixture and blocks:
        model, mixture = build_routed(cfg, model, tokenizer, [e for e, _ in kept], blocks)
    gate_report, fused = None, []
    build = None
    if fusing:
        fusion = fusion_for(cfg, model, tokenizer, experts)

        def build(candidate: Candidate) -> None:
            fused.append(fusion.apply(model, candidate.weights, candidate.scale))

    if cfg.gating.gate and screened.base_blocks is not None:
        weights, gate_report = _gate(cfg, model, tokenizer, experts, weights, method, blocks,
                                     screened.base_blocks, generation, build)  # fmt: skip
        kept = [(e, w) for e, w in zip(experts, weights, strict=True) if w > 0]
    elif build is not None:
        build(Candidate({e.label: w for e, w in zip(experts, weights, strict=True)}))
    else:
        merge_into(model, [e for e, _ in kept], [w for _, w in kept], method)
    best = None
    if matrix is not None:
        matrix = matrix.model_copy(update={"merged": losses(model, blocks)})
        logger.info("validation losses:\n%s", format_matrix(matrix))
        if mixture is not None:
            best = best_model(mixture, matrix, MIXTURE_DIR)
    manifest = Manifest(
        generation=generation,
        parent=ParentInfo(
            model=base_name, generation=parent_generation, files=parent_files, manifest_sha256=parent_manifest
        ),
        experts=[_entry(e, w) for e, w in zip(experts, weights, strict=True)],
        method=options.method,
        params=method.describe(),
        weight_source=source,
        evaluation=matrix,
        ranking=ranking(matrix) if matrix is not None else {},
        rankings=ranked,
        prequential=screened.cheap,
        agreement=agreed,
        best=best,
        gate=gate_report,
        fusion=fused[-1] if fused else None,
        reproduction=reproduction(device),
        files={},
    )
    routed = mixture

    def extra(directory: Path) -> None:
        if routed is not None:
            moe.save_mixture(directory / MIXTURE_DIR, routed.experts, routed.router, routed.hidden_size)

    final = publish(model, tokenizer, cfg.out, manifest, identity, extra=extra)
    logger.info(
        "published generation %d (%s, %d of %d experts) at %s in %.1f s",
        generation, options.method, len(kept), len(experts), final, time.monotonic() - started,
    )  # fmt: skip
    return final


def _gate(
    cfg: MergeConfig, model: nn.Module, tokenizer: Any, experts: list[Expert], weights: list[float],
    method: MergeMethod, blocks: dict[str, torch.Tensor], parent: dict[str, list[float]], generation: int,
    build: Build | None = None,
) -> tuple[list[float], GateReport]:  # fmt: skip
    """Merge into ``model`` the first candidate the publishing gate passes (:mod:`.gating`): judged on the
    evaluated domains and on general text no expert trains on. Raises :class:`.gating.GateRefused`."""
    options = cfg.gating
    trained = {e.metadata.expert for e in experts}
    general = options.gate_general
    if general is None:
        general = tuple(d for d in known_domains() if d not in trained and d not in blocks)
    general_blocks = domain_blocks(general, tokenizer, cfg.eval.eval_block_size, cfg.eval.eval_blocks)
    candidate, report = gated_merge(
        model, experts, {e.label: w for e, w in zip(experts, weights, strict=True)}, method,
        {**parent, **block_losses(model, general_blocks)}, {**blocks, **general_blocks}, set(general),
        generation, GateOptions(attempts=options.gate_attempts, level=options.gate_level,
                                budget_s=options.gate_budget_s, seed=cfg.merge.seed), build=build,
    )  # fmt: skip
    return [candidate.weights[e.label] for e in experts], report


def _entry(expert: Expert, weight: float) -> ExpertEntry:
    meta = expert.metadata
    return ExpertEntry(
        name=expert.label, expert=meta.expert, sha256=expert.sha256, weight=weight, steps=meta.steps,
        tokens=meta.tokens,
    )  # fmt: skip
