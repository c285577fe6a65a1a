"""``ExpertNode``: a volunteer that joins the swarm and trains its domain expert.

run() = join the DHT -> check the swarm's protocol -> load the 8-bit base + LoRA -> claim a data
shard -> inner steps, with one summary line and one signed TrainingProgress record per interval ->
on stop (max steps, max time, SIGTERM/Ctrl+C) save the adapter atomically and leave.

Generations: a :class:`BaseFollower` fetches and verifies each newer base the coordinator publishes;
at its next outer step the node saves its expert of the old generation, loads the new base with a
fresh adapter and joins its group's averaging for the new generation (the averagers' prefixes carry
the generation, so members on different bases never average together). The data stream goes on.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefetch_generator import BackgroundGenerator

from cogen.core import models
from cogen.core.checkpoint import AdapterMetadata, save_adapter
from cogen.core.config import NodeConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import train_batches
from cogen.core.exit_codes import CommandError, ExitCode
from cogen.core.swarm import SwarmClient, check_compatible
from cogen.core.telemetry import format_bytes, peak_memory_bytes
from cogen.node.follow import Base, BaseFollower, MirrorServer, generation_of, read_key
from cogen.node.group import GroupAverager
from cogen.node.hardware import detect_hardware
from cogen.node.health import NodeHealth
from cogen.node.metrics import NodeMetrics
from cogen.node.reporting import LossWindow, NodeReporter
from cogen.node.resume import (
    SavedState,
    TrainingState,
    base_identity,
    batches_to_skip,
    data_fingerprint,
    find_state,
    restore,
    save_state,
)
from cogen.node.shards import claim_shard
from cogen.node.trainer import ExpertTrainer
from cogen.protocols import GroupProgress, NodeInfo, RoundReport, software_version
from cogen.protocols.keys import group_prefix

logger = logging.getLogger(__name__)

STOP_LOCK_S = 5.0  #: how long a stopping node waits for a round to release the group's state before saving


class DataError(RuntimeError, CommandError):
    """The expert's domain data cannot be read (one-line explanation)."""

    exit_code = ExitCode.DATA
    what = "data"


def expert_name(expert: str) -> str:
    """The expert's name on the wire: the domain name, or a slug of a data directory's name."""
    if re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,63}", expert):
        return expert
    slug = re.sub(r"[^a-z0-9_\-]+", "-", Path(expert).name.lower()).strip("-_")[:64]
    return slug or "custom"


@dataclass(frozen=True)
class NodeResult:
    steps: int
    samples: int
    tokens: int
    train_loss: float | None
    checkpoint: Path | None
    peak_memory_bytes: int
    reason: str  # why training ended: max_steps, max_seconds, stopped


class ExpertNode:
    """Trains one expert; ``stop()`` (or the stop Event) ends it cleanly, saving the adapter."""

    def __init__(self, cfg: NodeConfig, stop_event: threading.Event | None = None):
        self.cfg = cfg
        self.stop_event = stop_event or threading.Event()
        self.expert = expert_name(cfg.data.expert)
        self.started_at = time.time()
        self.client: SwarmClient | None = None
        self.shard = 0
        self.losses = LossWindow()  # inner steps since the last summary; first and last loss of this base
        self.reporter: NodeReporter | None = None
        self.group: GroupAverager | None = None
        self._alone_logged = False
        self.metrics: NodeMetrics | None = None
        self.metrics_url: str | None = None
        self.generation = 0
        self.base_name = cfg.model.model
        self.base_id = self.base_label = cfg.model.model  # identity (for resuming) and name (announced)
        self._data_fingerprint = ""  # what the data stream depends on besides the shard (for resuming)
        self._saved_outer: int | None = None  # the outer step of the last saved training state
        self._saved_at: tuple[int, int | None] = (-1, None)  # (inner, outer step) of the last save
        self.follower: BaseFollower | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def is_running(self) -> bool:
        return self.client is not None and not self.stop_event.is_set()

    def run(self) -> NodeResult:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model_path = models.resolve_model(cfg.model.model, cfg.model.cache_dir)
        device = models.resolve_device(cfg.model.device)
        try:
            corpus = get_corpus(cfg.data.expert)
        except (ValueError, OSError) as e:
            raise DataError(str(e)) from None
        if cfg.metrics_port is not None:
            self.metrics = NodeMetrics(expert=self.expert, health=NodeHealth(self))
            logger.info("serving node metrics at %s", self.metrics.start(cfg.metrics_host, cfg.metrics_port))
        self.client = client = SwarmClient(cfg.network)
        try:
            if self.metrics is not None and self.metrics.port is not None:
                self.metrics_url = client.optional_url(
                    "node metrics", cfg.metrics_host, self.metrics.port, "/metrics"
                )
            check_compatible(client)
            logger.info(
                "joined swarm %r as %s; visible at %s",
                cfg.network.swarm,
                client.peer_id,
                " ".join(client.visible_maddrs()),
            )
            self.hardware = detect_hardware(device)
            self.follower = self._start_follower()
            model_path = self._newest_base(model_path)
            self._set_base(generation_of(model_path), model_path)
            self.reporter = NodeReporter(
                client, self.expert, self._node_info, cfg.network.record_ttl_s, self.losses, self.metrics
            )
            self._announce("joining")
            self.reporter.start()
            saved = find_state(cfg.output_dir, self.expert, self.generation, self.base_id)
            tokenizer = models.load_tokenizer(model_path)
            model, optimizer, scheduler = self._build(model_path, device)
            self.shard = claim_shard(
                client, self.expert, cfg.data.num_shards, cfg.network.record_ttl_s,
                preferred=saved.meta.shard if saved else None, previous=saved.meta.peer_id if saved else None,
            )  # fmt: skip
            self.reporter.claim = (self.shard, cfg.data.num_shards)  # renewed with the node's record
            fingerprint = data_fingerprint(corpus.name, cfg.data.block_size, cfg.data.batch_size,
                                           cfg.data.seed, cfg.data.validation_fraction)  # fmt: skip
            skip = batches_to_skip(saved, self.shard, cfg.data.num_shards, fingerprint)
            self._data_fingerprint = fingerprint
            logger.info(
                "training expert %r on shard %d/%d of %s, %s base on %s",
                self.expert,
                self.shard,
                cfg.data.num_shards,
                corpus.name,
                cfg.model.precision,
                device,
            )
            try:
                stream = train_batches(
                    corpus,
                    tokenizer,
                    block_size=cfg.data.block_size,
                    batch_size=cfg.data.batch_size,
                    shard=self.shard,
                    num_shards=cfg.data.num_shards,
                    seed=cfg.data.seed,
                    validation_fraction=cfg.data.validation_fraction,
                    skip_batches=skip,
                )
            except ValueError as e:
                raise DataError(str(e)) from None
            batches = BackgroundGenerator(stream, max_prefetch=4)
            trainer = ExpertTrainer(
                model, optimizer, scheduler, batches, max_grad_norm=cfg.optim.max_grad_norm
            )
            self.group = self._join_group(model, trainer, saved)
            trainer.batches = skip
            self._announce("training")
            while (reason := self._train(trainer, device)) == "new_base":
                base = self.follower.take() if self.follower is not None else None
                assert base is not None
                self._finish(model, trainer, device, f"moving to generation {base.generation}")
                model, trainer = self._switch_base(base, trainer, batches, device)
            if self.group is not None and reason != "stopped" and self.group.has_unaveraged(trainer.samples):
                self._outer_step(trainer, final=True)  # end on an outer step, so the group's members agree
            self._announce("stopping")
            return self._finish(model, trainer, device, reason)
        finally:
            if self.reporter is not None:
                self.reporter.stop()
            if self.follower is not None:
                self.follower.stop(timeout_s=2.0)  # a download in flight must not hold up the grace period
            if self.group is not None:
                self.group.shutdown()
            if self.metrics is not None:
                self.metrics.stop()
            client.shutdown()
            self.client = None

    def _build(self, model_path: str, device: torch.device) -> tuple[torch.nn.Module, Any, Any]:
        """The base (8-bit by default) with a fresh, seeded LoRA adapter, its optimizer and schedule."""
        cfg = self.cfg
        base = models.load_base(model_path, cfg.model.precision, device)
        model = models.add_lora(base, cfg.model, seed=cfg.data.seed)
        optimizer = models.build_optimizer(models.trainable_parameters(model), cfg.optim)
        scheduler = models.warmup_schedule(optimizer, cfg.optim.warmup_steps)
        return model, optimizer, scheduler

    def _start_follower(self) -> BaseFollower | None:
        cfg = self.cfg
        if not cfg.follow:
            return None
        assert self.client is not None
        bases_dir = cfg.bases_dir or models.cache_root(cfg.model.cache_dir) / "bases" / cfg.network.swarm
        mirror = None
        if cfg.serve_bases and not self.client.client_mode:  # behind NAT nobody could fetch from it
            host = cfg.serve_host or cfg.network.host
            mirror = MirrorServer(bases_dir, host)
            mirror.public_url = self.client.optional_url("base mirror", host, mirror.port, "/")
            if mirror.public_url is None:
                mirror.stop()
                mirror = None
        follower = BaseFollower(
            self.client, bases_dir, self.generation, read_key(cfg.trusted_key),
            interval_s=min(10.0, cfg.log_interval_s), mirror=mirror, fetch=cfg.fetch,
        )  # fmt: skip
        follower.start()
        return follower

    def _newest_base(self, model_path: str) -> str:
        """Start on the swarm's newest base rather than on ``--model``'s (a node restarted after the
        swarm moved on, or joining late): the follower's first look fetches and verifies it, or reuses
        the verified copy this node already has; bounded, so that a slow download does not hold up
        training (the node then moves to it at an outer step, as usual)."""
        if self.follower is None:
            return model_path
        deadline = time.monotonic() + self.cfg.fetch.fetch_timeout_s
        while not self.follower.looked.wait(0.2):  # a stop (SIGTERM) must not wait for the look
            if self.stop_event.is_set() or time.monotonic() > deadline:
                return model_path
        base = self.follower.take()
        if base is None:
            return model_path
        logger.info("%s: starting on generation %d, the swarm's newest (%s)", self.expert, base.generation,
                    base.path)  # fmt: skip
        return str(base.path)

    def _switch_base(
        self, base: Base, old: ExpertTrainer, batches: Any, device: torch.device
    ) -> tuple[torch.nn.Module, ExpertTrainer]:
        """Continue on ``base``: a fresh adapter on it, a new group for its generation, same data."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        self._set_base(base.generation, str(base.path))
        model, optimizer, scheduler = self._build(str(base.path), device)
        trainer = ExpertTrainer(
            model, optimizer, scheduler, batches, max_grad_norm=self.cfg.optim.max_grad_norm
        )
        trainer.steps, trainer.samples, trainer.tokens = old.steps, old.samples, old.tokens
        trainer.batches = old.batches
        self.losses.first_loss = None
        saved = find_state(self.cfg.output_dir, self.expert, self.generation, self.base_id)
        self.group = self._join_group(model, trainer, saved, restore_counters=False)
        logger.info("%s: now training on generation %d (%s)", self.expert, base.generation, base.path)
        self._announce("training")
        return model, trainer

    def _set_base(self, generation: int, path: str) -> None:
        """The base this node trains on from now: its generation, identity and announced name."""
        self.generation, self.base_name = generation, path
        self.base_id = base_identity(path, self.cfg.model.model)
        self.base_label = self.cfg.model.model if generation == 0 else Path(path).name  # gen-N-<manifest sha>

    def _join_group(
        self,
        model: torch.nn.Module,
        trainer: ExpertTrainer,
        saved: SavedState | None,
        restore_counters: bool = True,
    ) -> GroupAverager | None:
        """Set up outer steps with the expert's group, loading the group's state if it already trains,
        then resume from ``saved`` (disk) unless the group is ahead of it."""
        group = None
        loaded = False
        if not self.cfg.group.solo:
            assert self.client is not None
            group = GroupAverager(
                self.client.dht, group_prefix(self.cfg.network.swarm, self.expert, self.generation),
                models.trainable_parameters(model), self.cfg.group, stop=self.stop_event,
            )  # fmt: skip
            group.state_info = self._state_info(model)
            loaded = group.join()
            if loaded:
                logger.info("joined expert group %r at outer step %d", self.expert, group.outer_step)
        if saved is None:
            logger.info("%s: no saved training state for generation %d in %s: starting from a fresh adapter",
                        self.expert, self.generation, self.cfg.output_dir)  # fmt: skip
        else:
            try:
                how = restore(saved, model, trainer, group, loaded, restore_counters)
            except ValueError as e:
                logger.warning("not resuming from %s: %s", saved.path, e)
            else:
                logger.info("%s: resumed generation %d %s", self.expert, self.generation, how)
                if restore_counters:
                    self.losses.first_loss, self.losses.last_loss = (
                        saved.meta.first_loss,
                        saved.meta.train_loss,
                    )
        self._saved_outer = group.outer_step if group is not None else None
        return group

    def _save_state(self, trainer: ExpertTrainer, lock_timeout_s: float | None = None) -> Path:
        """Save the full training state (see :mod:`cogen.node.resume`)."""
        assert self.client is not None
        cfg, group = self.cfg, self.group
        meta = TrainingState(
            expert=self.expert, generation=self.generation, base=self.base_id, peer_id=self.client.peer_id,
            outer_step=group.outer_step if group is not None else None,
            samples_at_anchor=group.samples_at_anchor if group is not None else trainer.samples,
            steps=trainer.steps, samples=trainer.samples, tokens=trainer.tokens, skipped=trainer.skipped,
            batches_consumed=trainer.batches, shard=self.shard, num_shards=cfg.data.num_shards,
            data=self._data_fingerprint,
            first_loss=self.losses.first_loss, train_loss=self.losses.last_loss, optimizer=None, scheduler={},
        )  # fmt: skip
        path = save_state(cfg.output_dir, meta, trainer.model, trainer, group, lock_timeout_s)
        self._saved_outer = meta.outer_step
        self._saved_at = (trainer.steps, meta.outer_step)
        logger.info("%s: saved training state at outer step %s, inner step %d to %s",
                    self.expert, meta.outer_step, trainer.steps, path)  # fmt: skip
        return path

    def _checkpoint_due(self, trainer: ExpertTrainer) -> bool:
        """At an outer-step boundary: whether ``--checkpoint-every`` outer steps passed since the last save
        (a solo node: that many times ``--inner-steps`` inner steps)."""
        every = self.cfg.checkpoint_every
        if self.group is None:
            return trainer.steps % (every * self.cfg.group.inner_steps) == 0
        return self.group.outer_step - (self._saved_outer or 0) >= every

    def _groupmates_online(self) -> bool:
        """Whether another node announces itself on this expert (a cheap DHT read, no matchmaking)."""
        assert self.client is not None
        return any(
            entry.owner != self.client.owner and isinstance(entry.record, NodeInfo)
            and entry.record.expert == self.expert and entry.record.state != "stopping"
            and entry.record.generation == self.generation
            for entry in self.client.fetch("nodes")
        )  # fmt: skip

    def _outer_step(self, trainer: ExpertTrainer, final: bool = False) -> bool:
        """Average with the group (blocking; bounded by the averaging timeout) and publish the result.

        Returns whether a round was attempted (False while no groupmate is online)."""
        assert self.client is not None and self.group is not None
        self.group.state_info = self._state_info(None, trainer)
        if not self._groupmates_online():
            if not self._alone_logged:
                logger.info("%s: no other node trains this expert right now; training alone until one joins",
                            self.expert)  # fmt: skip
                self._alone_logged = True
            self.group.absorb_local(trainer.samples)  # its own progress is the group's state meanwhile
            self._publish_group(None)
            return False
        self._alone_logged = False
        self._announce("averaging")
        if self.cfg.group.overlap and not final:
            report = self.group.finish_round()  # the round started H inner steps ago
            self.group.begin_round(trainer.samples)
            if report is None:  # the first round is only starting
                self._announce("training")
                return True
        else:
            report = self.group.outer_step_now(trainer.samples)
        self._publish_group(report)
        logger.info(
            "%s | outer step %d %s | group of %d | %.1f s | %s sent",
            self.expert, self.group.outer_step, "applied" if report.ok else f"skipped ({report.reason})",
            report.group_size, report.duration_s, format_bytes(report.bytes_sent),
        )  # fmt: skip
        self._announce("training")
        return True

    def _publish_group(self, report: RoundReport | None) -> None:
        assert self.client is not None and self.group is not None and self.reporter is not None
        self.reporter.publish_group(GroupProgress(
            peer_id=self.client.peer_id, expert=self.expert, outer_step=self.group.outer_step,
            generation=self.generation, inner_steps=self.cfg.group.inner_steps,
            compression=self.cfg.group.compression,
            rounds_ok=self.group.rounds_ok, rounds_failed=self.group.rounds_failed,
            last_round=report or self.group.last_round,
        ))  # fmt: skip

    def _state_info(self, model: Any, trainer: ExpertTrainer | None = None) -> dict[str, Any]:
        """What the coordinator needs to turn the group's state into an expert checkpoint."""
        info = dict(self.group.state_info) if self.group is not None else {}
        if model is not None:
            info["names"] = [n for n, p in model.named_parameters() if p.requires_grad]
            info["adapter_config"] = _json_ready(model.peft_config["default"].to_dict())
        info.update(expert=self.expert, generation=self.generation, base_model=self.base_name[:256],
                    precision=self.cfg.model.precision)  # fmt: skip
        if trainer is not None:
            info.update(steps=trainer.steps, samples=trainer.samples, tokens=trainer.tokens,
                        train_loss=self.losses.last_loss, first_loss=self.losses.first_loss)  # fmt: skip
        return info

    def _train(self, trainer: ExpertTrainer, device: torch.device) -> str:
        """Inner steps (with outer steps and saves at the boundaries) until a reason to stop or switch."""
        cfg = self.cfg
        assert self.reporter is not None
        start = last_report = time.monotonic()
        while True:
            if self.stop_event.is_set():
                return "stopped"
            if cfg.max_steps is not None and trainer.steps >= cfg.max_steps:
                return "max_steps"
            if cfg.max_seconds is not None and time.monotonic() - start >= cfg.max_seconds:
                return "max_seconds"
            stats = trainer.step()
            self.reporter.observe(stats.loss, stats.samples, stats.tokens, stats.seconds)
            at_boundary = self.group is not None and trainer.steps % self.cfg.group.inner_steps == 0
            if at_boundary:
                self._outer_step(trainer)
            if trainer.steps % cfg.group.inner_steps == 0 and self._checkpoint_due(trainer):
                self._save_state(trainer)
            if at_boundary and self.follower is not None and self.follower.has_ready():
                return "new_base"
            if time.monotonic() - last_report >= cfg.log_interval_s:
                self._report(trainer, device)
                last_report = time.monotonic()

    def _report(self, trainer: ExpertTrainer, device: torch.device) -> None:
        assert self.reporter is not None
        peak = peak_memory_bytes(device)
        self.reporter.report(trainer.steps, trainer.samples, trainer.tokens, trainer.skipped, peak)

    def _node_info(self, state: str) -> NodeInfo:
        """This node's record in ``state`` (built by the reporter each time it publishes)."""
        assert self.client is not None
        return NodeInfo(
            peer_id=self.client.peer_id, expert=self.expert, hardware=self.hardware,
            software_version=software_version(), model=self.base_label[:256],
            precision=self.cfg.model.precision, shard=self.shard, num_shards=self.cfg.data.num_shards,
            state=state,  # type: ignore[arg-type]
            started_at=self.started_at, updated_at=time.time(), metrics_url=self.metrics_url,
            generation=self.generation,
        )  # fmt: skip

    def _announce(self, state: str) -> None:
        assert self.reporter is not None
        self.reporter.set_state(state)

    def _finish(
        self, model: torch.nn.Module, trainer: ExpertTrainer, device: torch.device, reason: str
    ) -> NodeResult:
        cfg = self.cfg
        if self.losses.losses:
            self._report(trainer, device)
        meta = AdapterMetadata(
            expert=self.expert,
            base_model=self.base_name,
            precision=cfg.model.precision,
            generation=self.generation,
            steps=trainer.steps,
            samples=trainer.samples,
            tokens=trainer.tokens,
            train_loss=self.losses.last_loss,
            outer_step=self.group.outer_step if self.group is not None else None,
        )
        ckpt = save_adapter(model, cfg.output_dir, meta)
        if self._saved_at != (trainer.steps, meta.outer_step):  # not saved at this very step yet
            try:  # a stopping node does not wait out a round that still holds the group's state
                self._save_state(trainer, STOP_LOCK_S if self.stop_event.is_set() else None)
            except TimeoutError as e:
                logger.warning("%s: training state not saved (%s); a restart resumes from the last one saved",
                               self.expert, e)  # fmt: skip
        peak = peak_memory_bytes(device)
        logger.info(
            "%s: %s after %d steps (%d tokens); adapter saved to %s; peak memory %s",
            self.expert,
            reason,
            trainer.steps,
            trainer.tokens,
            ckpt,
            format_bytes(peak),
        )
        return NodeResult(
            trainer.steps, trainer.samples, trainer.tokens, self.losses.last_loss, ckpt, peak, reason
        )


def _json_ready(value: Any) -> Any:
    """A PEFT config dict as plain JSON types, as PEFT writes it (sets become sorted lists, enums
    their values): it travels with the group's state and becomes the collected adapter's config."""

    def default(o: Any) -> Any:
        return sorted(o, key=str) if isinstance(o, (set, frozenset)) else str(o)

    return json.loads(json.dumps(value, default=default))
