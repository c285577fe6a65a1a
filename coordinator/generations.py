"""Generations: collect every group's expert from the swarm, rank and merge them, publish the next base.

:class:`GenerationLoop` runs in the coordinator's background. When the generation is due
(:class:`cogen.coordinator.schedule.GenerationSchedule`: by time or by outer steps, from records no
single peer can steer), then:

1. **collect**: for each expert with nodes on the current generation, the coordinator downloads the
   group's state from its members and writes it as an expert checkpoint (:mod:`cogen.coordinator.collect`);
   ended by outer steps, every collected state must show those outer steps itself, else nothing is merged;
2. **merge**: :func:`cogen.coordinator.merging.merge_experts` evaluates base and experts on every
   built-in domain among the experts, ranks them, merges with the configured options and publishes
   ``gen-N`` (HF checkpoint + signed manifest) atomically under ``out_dir`` when the publishing gate
   passes a candidate; when it does not, the parent stays the base, the gate's report is written
   beside the collected experts (``gate.json``) and the generation continues until the next try;
3. **announce**: once the published generation verifies under the coordinator's key, a
   :class:`CheckpointSource` record points at the files, served by the coordinator's HTTP server under
   ``/checkpoints/``; nodes fetch, verify and move to it at their next outer step.

A failed collection or merge fails closed (nothing is announced) and is retried with exponential
backoff (:class:`cogen.core.backoff.Backoff`), never at once. A restarted coordinator picks up where it
was: it removes what a killed publish left, reads back every published generation that verifies (the
newest is the current base, numbering continues from it, the API lists them all) and serves only
those; a generation that was being merged when it was killed is collected and merged again under the
same number.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from hivemind.utils import get_dht_time

from cogen.coordinator.claims import gather_claims, write_claims
from cogen.coordinator.collect import download_state, save_state
from cogen.coordinator.config import CoordinatorConfig, MergeConfig
from cogen.coordinator.foreign import collect_foreign, foreign_groups
from cogen.coordinator.generation_files import CLAIMS_FILE, read_refusal, record_refusal, summarize
from cogen.coordinator.merging import MergeError, merge_experts
from cogen.coordinator.merging.fusion.fuse import FUSE
from cogen.coordinator.merging.gating import GateRefused
from cogen.coordinator.merging.manifest import signing_identity
from cogen.coordinator.merging.publish import published_generations, remove_stale_temps
from cogen.coordinator.schedule import Due, GenerationSchedule
from cogen.core import models
from cogen.core.backoff import Backoff
from cogen.core.corpora import known_domains
from cogen.core.model_identity import model_identity
from cogen.core.swarm import SwarmClient
from cogen.protocols import CheckpointSource
from cogen.protocols.gate import GateReport
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE, Manifest, ManifestError, verify_manifest

logger = logging.getLogger(__name__)


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
        self.identity = signing_identity(cfg.keys, cfg.cache)
        self.base = models.resolve_model(cfg.model, cfg.cache.cache_dir)
        self.model_sha256 = model_identity(self.base).model_sha256  # generation 0's: announced in SwarmInfo
        self.schedule = GenerationSchedule(client, cfg.schedule, model_sha256=self.model_sha256)
        self._foreign: list[tuple[str, Path]] = []  # the foreign experts collected for the merge under way
        self.published: list[tuple[Manifest, str, Path]] = []
        self._merging: threading.Thread | None = None
        self._merged: Path | None = None
        self._backoff = Backoff(self.RETRY_BASE_S, self.RETRY_CAP_S)
        self._retry_at = 0.0  # after a failed collection or merge, when to try again
        self.refused: GateReport | None = None  # the gate's last refusal (the parent stayed the base)
        self._restore()

    @property
    def generation(self) -> int:
        """The generation of the current base (what the experts train on now)."""
        return self.schedule.generation

    def _restore(self) -> None:
        """Continue from what ``out_dir`` holds: its newest verifying generation is the current base."""
        for stale in remove_stale_temps(self.out_dir):
            logger.info("removed %s, left by a publish that did not finish", stale)
        self.published = published_generations(self.out_dir, self.identity.public_key)
        newest = self.published[-1][0].generation if self.published else 0
        self.refused = read_refusal(self.out_dir, newest + 1)  # why the next one was not published yet
        self.monitor.set_refusal(self.refused)
        if not self.published:
            return
        manifest, _, final = self.published[-1]
        self.base = str(final)
        # the generation's clock started when it was published, not when this process did
        self.schedule.begin(
            manifest.generation, min(max(0.0, time.time() - manifest.created_at), 10 * 86400.0)
        )
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
        limit = self.cfg.schedule.max_generations
        if (limit is not None and self.generation >= limit) or time.monotonic() < self._retry_at:
            return
        due = self.schedule.due()
        if due is None:
            return
        paths = self._collect(due)
        if not paths:
            delay = self._failed()
            logger.warning(
                "no expert could be collected (attempt %d); generation %d continues, next try in %.0f s",
                self._backoff.failures, self.generation, delay,
            )  # fmt: skip
        else:
            self._merged = None
            self._merging = threading.Thread(
                target=self._merge, args=(paths, due.experts), name="merge", daemon=True
            )
            self._merging.start()

    @property
    def merging(self) -> bool:
        return self._merging is not None and self._merging.is_alive()

    def wait(self, timeout_s: float) -> None:
        """Let a merge in progress finish (on shutdown), up to ``timeout_s``."""
        if self._merging is not None:
            self._merging.join(timeout_s)

    def _collect(self, due: Due) -> list[Path]:
        """Each due expert's checkpoint; none at all when a collected state falls short of its claims."""
        nxt = self.generation + 1
        logger.info("generation %d ends: collecting %s", self.generation, ", ".join(due.experts))
        collected = self.out_dir / "collected" / f"gen-{nxt:06d}"
        shutil.rmtree(collected, ignore_errors=True)  # an earlier try's experts (or a killed one's temps)
        paths: list[Path] = []
        for expert in due.experts:
            try:
                info, tensors = download_state(
                    self.client, expert, self.generation, self.cfg.schedule.collect_timeout_s
                )
                if due.short_of(info):
                    logger.warning(
                        "%r's state is at outer step %d, not the %d its group claimed: nothing is merged",
                        expert, info.outer_step, due.outer_steps,
                    )  # fmt: skip
                    shutil.rmtree(collected, ignore_errors=True)
                    return []
                paths.append(save_state(info, tensors, self.base, collected))
                logger.info("collected expert %r from its group (outer step %d)", expert, info.outer_step)
            except Exception as e:  # one group's failure must not stop the rest
                logger.warning("could not collect expert %r: %s", expert, e)
        if paths:  # what the experts' nodes claimed, for the cheap ranking (cogen.coordinator.claims)
            claims = gather_claims(self.client, due.experts, self.generation, self.model_sha256)
            write_claims(claims, collected / CLAIMS_FILE)
        self._foreign = self._collect_foreign(collected) if paths else []
        return paths

    def _collect_foreign(self, collected: Path) -> list[tuple[str, Path]]:
        """The foreign experts' checkpoints (cogen.coordinator.foreign), when the merge can fuse them."""
        groups = foreign_groups(self.client, self.model_sha256)
        if not groups:
            return []
        if self.cfg.merge.method != FUSE:
            logger.info("%d foreign experts (%s) are not merged: --merge-method %s cannot use them, fuse can",
                        len(groups), ", ".join(f"{g.expert} on {g.model}" for g in groups),
                        self.cfg.merge.method)  # fmt: skip
            return []
        return collect_foreign(self.client, groups, collected, self.cfg.schedule.collect_timeout_s,
                               self.cfg.cache.cache_dir)  # fmt: skip

    def _failed(self) -> float:
        """Count a failed attempt; the next one waits for the backoff's delay."""
        delay = self._backoff.failed()
        self._retry_at = time.monotonic() + delay
        return delay

    def merge_config(self, paths: list[Path], experts: list[str]) -> MergeConfig:
        """The merge of the next generation: the coordinator's own merge, eval, mixture, key and cache."""
        cfg = self.cfg
        fusion = cfg.fusion
        if self._foreign:  # foreign experts teach the fused base; their domains are evaluated too
            sources = (*fusion.fuse_sources, *(path for _, path in self._foreign))
            fusion = fusion.model_copy(update={"fuse_sources": sources})
            experts = [*experts, *(expert for expert, _ in self._foreign)]
        # every domain the parent was evaluated on stays evaluated (a group that has not reached its
        # first outer step on this base is not collected, but the merged base is every group's next base)
        evaluated = self.published[-1][0].evaluation if self.published else None
        inherited = evaluated.domains if evaluated is not None else []
        domains = tuple(dict.fromkeys(d for d in (*experts, *inherited) if d in known_domains()))
        return MergeConfig(
            experts=tuple(paths), merge=cfg.merge, model=self.base, out=self.out_dir,
            generation=self.generation + 1, eval_domains=domains, eval=cfg.eval, moe=cfg.moe,
            gating=cfg.gating, fusion=fusion, keys=cfg.keys, cache=cfg.cache, claims=self._claims(),
        )  # fmt: skip

    def _claims(self) -> Path | None:
        """The experts' prequential claims gathered at this collection (None: none written)."""
        path = self.out_dir / "collected" / f"gen-{self.generation + 1:06d}" / CLAIMS_FILE
        return path if path.is_file() else None

    def _merge(self, paths: list[Path], experts: list[str]) -> None:
        nxt = self.generation + 1
        try:
            self._merged = merge_experts(self.merge_config(paths, experts))
        except GateRefused as e:  # the parent stays the base; the evidence is kept beside the experts
            self.refused = e.report
            record_refusal(self.out_dir, e.report)
            self.monitor.set_refusal(e.report)
            delay = self._failed()
            logger.warning(
                "generation %d not published (attempt %d): %s; generation %d continues on its parent, "
                "next try in %.0f s", nxt, self._backoff.failures, e, self.generation, delay,
            )  # fmt: skip
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
        """Take a finished merge: announced only if it verifies under this coordinator's key."""
        nxt = self.generation + 1
        try:
            manifest = verify_manifest(final, self.identity.public_key)
        except ManifestError as e:
            delay = self._failed()
            logger.warning(
                "generation %d does not verify, not announced: %s; next try in %.0f s", nxt, e, delay
            )
            return
        sha = sha256_file(final / MANIFEST_FILE)
        self.published.append((manifest, sha, final))
        self.monitor.set_generations([summarize(m, s) for m, s, _ in self.published])
        self.refused = None
        self.monitor.set_refusal(None)
        self.base = str(final)
        self.schedule.begin(nxt)
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
