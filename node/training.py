"""The training loop of a node: inner steps, outer steps with the group at each boundary, saves.

:meth:`TrainingLoop._train` runs inner steps with one summary line and one signed TrainingProgress
record per interval, an outer step every ``--inner-steps`` (alone while no groupmate is online), a
save of the full training state every ``--checkpoint-every`` outer steps, until a reason to stop
(max steps, max time, a stop) or to move to a new base; :meth:`TrainingLoop._finish` saves the
adapter atomically (see :mod:`cogen.node.state` for how the node's layers fit together).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cogen.core.checkpoint import AdapterMetadata, save_adapter
from cogen.core.telemetry import format_bytes, peak_memory_bytes
from cogen.node.switching import BaseSwitching
from cogen.node.trainer import ExpertTrainer
from cogen.node.training_state import TrainingState, save_state

logger = logging.getLogger(__name__)

STOP_LOCK_S = 5.0  #: how long a stopping node waits for a round to release the group's state before saving


@dataclass(frozen=True)
class NodeResult:
    steps: int
    samples: int
    tokens: int
    train_loss: float | None
    checkpoint: Path | None
    peak_memory_bytes: int
    reason: str  # why training ended: max_steps, max_seconds, stopped


class TrainingLoop(BaseSwitching):
    """Inner and outer steps, saves and the end of training."""

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

    def _save_state(self, trainer: ExpertTrainer, lock_timeout_s: float | None = None) -> Path:
        """Save the full training state (see :mod:`cogen.node.training_state`)."""
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
