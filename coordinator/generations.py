"""Generations: collect every group's expert from the swarm, rank and merge them, publish the next base.

:class:`GenerationLoop` runs in the coordinator's background. A generation ends after
``generation_s`` seconds, or once every expert group on the current base has made
``generation_outer_steps`` outer steps (whichever is configured; both: the first). Then:

1. **collect**: for each expert with nodes on the current generation, the coordinator joins the
   group's state averager as an auxiliary peer and loads its state from the members
   (``DecentralizedAverager.load_state_from_peers``, exactly what a joining node does) — the anchor
   weights, the parameter names and the adapter config — and writes it as an expert checkpoint.
   Nobody uploads files, and the group keeps training;
2. **merge**: :func:`cogen.coordinator.merging.merge_experts` evaluates base and experts on every
   built-in domain among the experts, ranks them, merges with the configured method and publishes
   ``gen-N`` (HF checkpoint + signed manifest) atomically under ``out_dir``;
3. **announce**: a :class:`CheckpointSource` record points at the files, served by the coordinator's
   HTTP server under ``/checkpoints/``; nodes fetch, verify and move to it at their next outer step.

A failed collection or merge is retried with exponential backoff (:class:`cogen.core.backoff.Backoff`).
A restarted coordinator picks up where it was: it removes what a killed publish left, reads back every
published generation that verifies (the newest is the current base, numbering continues from it, the
API lists them all) and serves only those; a generation that was being merged when it was killed is
collected and merged again under the same number.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from hivemind.utils import get_dht_time

from cogen.coordinator.merging import MergeError, merge_experts
from cogen.coordinator.merging.manifest import Identity
from cogen.coordinator.merging.merge import IDENTITY_FILE
from cogen.coordinator.merging.publish import published_generations, remove_stale_temps
from cogen.coordinator.schemas import DomainScore, GenerationSummary
from cogen.core import models
from cogen.core.backoff import Backoff
from cogen.core.checkpoint import AdapterMetadata, save_adapter_tensors
from cogen.core.config import CoordinatorConfig, MergeConfig
from cogen.core.corpora import known_domains
from cogen.core.swarm import GroupStateAverager, SwarmClient
from cogen.protocols import (
    CheckpointSource,
    GroupProgress,
    GroupStateInfo,
    GroupStateRejected,
    NodeInfo,
    parse_group_state,
)
from cogen.protocols.hashing import sha256_file
from cogen.protocols.keys import group_prefix, state_prefix
from cogen.protocols.manifest import MANIFEST_FILE, Manifest, read_manifest

logger = logging.getLogger(__name__)

_LORA = (".lora_A.", ".lora_B.")


class CollectError(RuntimeError):
    """A group's state could not be loaded or does not describe a LoRA expert (one line)."""


def collect_expert(
    client: SwarmClient, expert: str, generation: int, base_model: str, out_dir: Path, timeout_s: float
) -> Path:
    """Load ``expert``'s group state from its members and save it as an expert checkpoint."""
    prefix = state_prefix(group_prefix(client.cfg.swarm, expert, generation))
    averager = GroupStateAverager(
        [torch.zeros(1)], client.dht, prefix=prefix, target_group_size=2, min_matchmaking_time=1.0,
        client_mode=True, allow_state_sharing=False, start=True,
    )  # fmt: skip
    try:
        loaded = averager.load_state_from_peers(timeout=timeout_s)
    finally:
        averager.shutdown()
    if loaded is None:
        raise CollectError(f"no member of {expert!r} shared its state within {timeout_s:.0f} s")
    return save_group_state(expert, generation, base_model, loaded[0], list(loaded[1]), out_dir)


def save_group_state(
    expert: str, generation: int, base_model: str, metadata: Any, tensors: list[torch.Tensor], out_dir: Path
) -> Path:
    """Save a group's downloaded state (its :class:`GroupStateInfo` metadata and tensors) as the expert
    checkpoint ``out_dir/<expert>``; raises :class:`CollectError` (one line) on a state that is not a
    valid one of ``expert``'s group on ``generation``."""
    try:
        info = parse_group_state(metadata)
    except GroupStateRejected as e:
        raise CollectError(f"{expert}: refused its group state: {e}") from None
    if (info.expert, info.generation) != (expert, generation):
        raise CollectError(
            f"{expert}: the group state says it is {info.expert!r} on generation {info.generation}, "
            f"not generation {generation}"
        )
    tensors_by_name = _adapter_tensors(expert, info, tensors)
    if info.outer_step == 0:  # the group state is still its initial adapter: nothing to merge
        raise CollectError(f"{expert!r} has not applied its first outer step yet")
    meta = AdapterMetadata(
        expert=expert, base_model=base_model, precision=info.precision,
        steps=info.steps, samples=info.samples, tokens=info.tokens,
        train_loss=info.train_loss, first_loss=info.first_loss, outer_step=info.outer_step,
    )  # fmt: skip
    config = {**info.adapter_config, "base_model_name_or_path": base_model}
    return save_adapter_tensors(tensors_by_name, config, out_dir / expert, meta)


def _adapter_tensors(
    expert: str, info: GroupStateInfo, tensors: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The anchor half of the state, keyed by PEFT's saved names; refuses anything that is not that."""
    names = info.names
    if len(tensors) != 2 * len(names):  # anchors, then the outer momenta
        raise CollectError(f"{expert}: {len(tensors)} tensors for {len(names)} parameters")
    out = {}
    for name, tensor in zip(names, tensors[: len(names)], strict=True):
        if not any(tag in name for tag in _LORA):
            raise CollectError(f"{expert}: {name} is not a LoRA parameter")
        if not torch.isfinite(tensor).all():
            raise CollectError(f"{expert}: {name} holds NaN or Inf")
        out[name.replace(".default.", ".")] = tensor.detach().float().contiguous()
    return out


def summarize(manifest: Manifest, manifest_sha256: str) -> GenerationSummary:
    """A published generation as the API and the dashboard show it."""
    scores = []
    if manifest.evaluation is not None:
        best, base = manifest.best, manifest.evaluation.base
        for domain in manifest.evaluation.domains:
            # the base the experts started from, then each expert, the merged base and the mixture
            scores.append(DomainScore(domain=domain, expert="base", loss=base.get(domain)))
            if best is not None and best.kind == "moe":
                scores.append(DomainScore(domain=domain, expert="mixture", loss=best.losses.get(domain)))
            order = manifest.ranking.get(domain, [])
            for expert, losses in manifest.evaluation.experts.items():
                rank = order.index(expert) + 1 if expert in order else None
                scores.append(DomainScore(domain=domain, expert=expert, loss=losses.get(domain), rank=rank))
            if manifest.evaluation.merged is not None:
                scores.append(
                    DomainScore(domain=domain, expert="merged", loss=manifest.evaluation.merged.get(domain))
                )
    weights = {e.name: e.weight for e in manifest.experts}
    ranked = manifest.rankings
    order = ranked.order if ranked is not None else sorted(weights, key=lambda e: -weights[e])
    return GenerationSummary(
        generation=manifest.generation,
        base_hash=manifest.files.get("model.safetensors", manifest_sha256),
        parent_hash=manifest.parent.manifest_sha256,
        created_at=manifest.created_at,
        manifest_hash=manifest_sha256,
        signature_ok=True,
        merge_method=manifest.method,
        ranking=order,
        kendall_tau=ranked.cheap.kendall_tau if ranked is not None and ranked.cheap is not None else None,
        scores=scores,
    )


class GenerationLoop:
    """Ends generations, merges and publishes them (see the module docstring).

    :meth:`poll` runs in the coordinator's main thread (hivemind averagers, which collecting needs,
    must be created there); the merge itself runs in a background thread, so the coordinator keeps
    announcing the swarm and serving its API meanwhile. :meth:`announce` is called by the coordinator's
    announcer thread, so a long collection never lets the checkpoint record expire."""

    #: retries after a failed collection or merge: 5 s, doubling, at most 2 minutes apart
    RETRY_BASE_S = 5.0
    RETRY_CAP_S = 120.0

    def __init__(self, client: SwarmClient, cfg: CoordinatorConfig, monitor: Any, api_url: str):
        self.client = client
        self.cfg = cfg
        self.monitor = monitor
        self.api_url = api_url.rstrip("/")
        self.out_dir = Path(cfg.out_dir)
        self.identity = Identity.load_or_create(
            cfg.identity or models.cache_root(cfg.cache_dir) / IDENTITY_FILE
        )
        self.base = models.resolve_model(cfg.model, cfg.cache_dir)
        self.generation = 0
        self.started = time.monotonic()
        self.published: list[tuple[Manifest, str, Path]] = []
        self._merging: threading.Thread | None = None
        self._merged: Path | None = None
        self._backoff = Backoff(self.RETRY_BASE_S, self.RETRY_CAP_S)
        self._retry_at = 0.0  # after a failed collection or merge, when to try again
        self._restore()

    def _restore(self) -> None:
        """Continue from what ``out_dir`` holds: its newest verifying generation is the current base."""
        for stale in remove_stale_temps(self.out_dir):
            logger.info("removed %s, left by a publish that did not finish", stale)
        self.published = published_generations(self.out_dir, self.identity.public_key)
        if not self.published:
            return
        manifest, _, final = self.published[-1]
        self.base, self.generation = str(final), manifest.generation
        # the generation's clock started when it was published, not when this process did
        self.started = time.monotonic() - min(max(0.0, time.time() - manifest.created_at), 10 * 86400.0)
        self.monitor.set_generations([summarize(m, s) for m, s, _ in self.published])
        logger.info(
            "resuming from %s: %d published generations verify, generation %d is the current base (%s)",
            self.out_dir, len(self.published), self.generation, final,
        )  # fmt: skip

    @property
    def manifest_key(self) -> str:
        return self.identity.public_key

    def poll(self) -> None:
        """One look: take a finished merge, or end the generation if it is due."""
        if self._merging is not None:
            if self._merging.is_alive():
                return
            self._merging = None
            if self._merged is not None:
                self._published(self._merged)
        limit = self.cfg.max_generations
        if (limit is not None and self.generation >= limit) or not self._due():
            return
        if time.monotonic() < self._retry_at:
            return
        experts = self._experts()
        paths = self._collect(experts) if experts else []
        if not paths:
            delay = self._failed()
            logger.warning(
                "no expert could be collected (attempt %d); generation %d continues, next try in %.0f s",
                self._backoff.failures, self.generation, delay,
            )  # fmt: skip
        else:
            self._merged = None
            self._merging = threading.Thread(
                target=self._merge, args=(paths, experts), name="merge", daemon=True
            )
            self._merging.start()

    @property
    def merging(self) -> bool:
        return self._merging is not None and self._merging.is_alive()

    def wait(self, timeout_s: float) -> None:
        """Let a merge in progress finish (on shutdown), up to ``timeout_s``."""
        if self._merging is not None:
            self._merging.join(timeout_s)

    def _due(self) -> bool:
        cfg = self.cfg
        if cfg.generation_s is not None and time.monotonic() - self.started >= cfg.generation_s:
            return True
        if cfg.generation_outer_steps is None:
            return False
        experts = self._experts()
        steps: dict[str, int] = {}
        for entry in self.client.fetch(GroupProgress):
            r = entry.record
            if isinstance(r, GroupProgress) and r.generation == self.generation and r.expert in experts:
                steps[r.expert] = max(steps.get(r.expert, 0), r.outer_step)
        return bool(experts) and all(steps.get(e, 0) >= cfg.generation_outer_steps for e in experts)

    def _experts(self) -> list[str]:
        """Experts with a node on the current generation's base."""
        return sorted({
            e.record.expert for e in self.client.fetch(NodeInfo)
            if isinstance(e.record, NodeInfo) and e.record.generation == self.generation
            and e.record.state != "stopping"
        })  # fmt: skip

    def _collect(self, experts: list[str]) -> list[Path]:
        nxt = self.generation + 1
        logger.info("generation %d ends: collecting %s", self.generation, ", ".join(experts))
        collected = self.out_dir / "collected" / f"gen-{nxt:06d}"
        shutil.rmtree(collected, ignore_errors=True)  # an earlier try's experts (or a killed one's temps)
        paths: list[Path] = []
        for expert in experts:
            try:
                paths.append(collect_expert(
                    self.client, expert, self.generation, self.base, collected, self.cfg.collect_timeout_s
                ))  # fmt: skip
                logger.info("collected expert %r from its group", expert)
            except Exception as e:  # one group's failure must not stop the generation
                logger.warning("could not collect expert %r: %s", expert, e)
        return paths

    def _failed(self) -> float:
        """Count a failed attempt; the next one waits for the backoff's delay."""
        delay = self._backoff.failed()
        self._retry_at = time.monotonic() + delay
        return delay

    def _merge(self, paths: list[Path], experts: list[str]) -> None:
        nxt = self.generation + 1
        merge_cfg = MergeConfig(
            experts=tuple(paths), method=self.cfg.merge_method, density=self.cfg.merge_density,
            model=self.base, out=self.out_dir, generation=nxt,
            eval_domains=tuple(e for e in experts if e in known_domains()),
            eval_blocks=self.cfg.eval_blocks, eval_block_size=self.cfg.eval_block_size,
            mixture=self.cfg.mixture, router_blocks=self.cfg.router_blocks,
            identity=self.cfg.identity, cache_dir=self.cfg.cache_dir,
        )  # fmt: skip
        try:
            self._merged = merge_experts(merge_cfg)
        except Exception as e:  # MergeError: e.g. no expert is better than the base yet; try again later
            delay = self._failed()
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, MergeError):
                reason = f"{type(e).__name__}: {reason}"
                logger.debug("merging generation %d failed", nxt, exc_info=True)
            logger.warning(
                "generation %d not published (attempt %d): %s; generation %d continues, next try in %.0f s",
                nxt, self._backoff.failures, reason, self.generation, delay,
            )  # fmt: skip

    def _published(self, final: Path) -> None:
        nxt = self.generation + 1
        manifest = read_manifest(final)
        sha = sha256_file(final / MANIFEST_FILE)
        self.published.append((manifest, sha, final))
        self.monitor.set_generations([summarize(m, s) for m, s, _ in self.published])
        self.base, self.generation, self.started = str(final), nxt, time.monotonic()
        self._backoff.succeeded()
        self.announce()
        logger.info("generation %d published (%s): %s", nxt, manifest.method, final)

    def served(self) -> set[str]:
        """Names of the generation dirs the coordinator serves: published ones that verify, no others."""
        return {final.name for _, _, final in self.published}

    def announce(self) -> None:
        """Point the swarm at the newest published generation (a :class:`CheckpointSource` record)."""
        if not self.published:
            return
        manifest, sha, final = self.published[-1]
        self.client.publish(CheckpointSource(
            peer_id=self.client.peer_id, generation=manifest.generation, manifest_sha256=sha,
            url=f"{self.api_url}/checkpoints/{final.name}/", time=get_dht_time(),
        ))  # fmt: skip
