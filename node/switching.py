"""The base a node trains on: starting on the swarm's newest, moving to each newer generation, and
joining the expert's group on it.

A :class:`~cogen.node.follow.BaseFollower` fetches and verifies each newer base the coordinator
publishes; at its next outer step the node saves its expert of the old generation, loads the new base
with a fresh adapter and joins its group's averaging for the new generation (the averagers' prefixes
carry the generation, so members on different bases never average together). Joining a group loads
the group's state if it already trains, then resumes from the node's saved state unless the group is
ahead of it (see :mod:`cogen.node.state` for how the node's layers fit together).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from cogen.core import models
from cogen.core.model_identity import model_identity
from cogen.node.announcing import NodeAnnouncing
from cogen.node.follow import Base, BaseFollower, MirrorServer
from cogen.node.foreign import swarm_model
from cogen.node.group import GroupAverager
from cogen.node.resume import base_identity, find_state, restore
from cogen.node.trainer import ExpertTrainer
from cogen.node.training_state import SavedState
from cogen.protocols import GroupStateInfo
from cogen.protocols.keys import foreign_group_prefix, group_prefix

logger = logging.getLogger(__name__)


class BaseSwitching(NodeAnnouncing):
    """The node's base and group: building the model, following generations, joining the group."""

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
        if not cfg.follow or self.foreign:
            return None
        assert self.client is not None
        bases_dir = (
            cfg.bases_dir or models.cache_root(cfg.model.cache.cache_dir) / "bases" / cfg.network.swarm
        )
        mirror = None
        if cfg.serve_bases and not self.client.client_mode:  # behind NAT nobody could fetch from it
            host = cfg.serve_host or cfg.network.host
            mirror = MirrorServer(bases_dir, host)
            mirror.start()
            mirror.public_url = self.client.optional_url("base mirror", host, mirror.port, "/")
            if mirror.public_url is None:
                mirror.stop()
                mirror = None
        follower = BaseFollower(
            self.client, bases_dir, self.generation, self.trust,
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
            model, optimizer, scheduler, batches, max_grad_norm=self.cfg.optim.max_grad_norm,
            row_sources=old.row_sources, repeats=old.repeats,
        )  # fmt: skip
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

    def _group_prefix(self) -> str:
        """The group this node averages in: its expert's on its generation, or on its foreign model."""
        swarm = self.cfg.network.swarm
        if self.foreign and self.identity.model_sha256 is not None:
            return foreign_group_prefix(swarm, self.expert, self.identity.model_sha256)
        return group_prefix(swarm, self.expert, self.generation)

    def _foreign_base(self, model_path: str) -> bool:
        """Whether ``model_path`` is another model than the swarm's base (see :mod:`cogen.node.foreign`)."""
        assert self.client is not None
        self.identity = model_identity(model_path)
        if self.identity.model_sha256 is None:
            return False
        swarm = swarm_model(self.client, self.trust)
        if swarm is None or swarm == self.identity.model_sha256:
            return False
        logger.info(
            "%s: %s (%s) is not the swarm's base: training a foreign expert on it, in a group of its own, "
            "not following the swarm's generations; the coordinator fuses it as a teacher",
            self.expert, self.cfg.model.model, self.identity.architecture or "unknown architecture",
        )  # fmt: skip
        return True

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
                self.client.dht, self._group_prefix(),
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

    def _state_info(self, model: Any, trainer: ExpertTrainer | None = None) -> GroupStateInfo:
        """What the coordinator needs to turn the group's state into an expert checkpoint: the adapter's
        names and config from ``model`` (else as sent so far), the base, and the trainer's counters."""
        sent = self.group.state_info if self.group is not None else None
        info: dict[str, Any] = sent.model_dump() if sent is not None else {}
        if model is not None:
            info["names"] = tuple(n for n, p in model.named_parameters() if p.requires_grad)
            info["adapter_config"] = _json_ready(model.peft_config["default"].to_dict())
        info.update(expert=self.expert, generation=self.generation, base_model=self.base_name[:256],
                    precision=self.cfg.model.precision)  # fmt: skip
        if trainer is not None:
            info.update(steps=trainer.steps, samples=trainer.samples, tokens=trainer.tokens,
                        train_loss=self.losses.last_loss, first_loss=self.losses.first_loss)  # fmt: skip
        return GroupStateInfo.model_validate(info)


def _json_ready(value: Any) -> Any:
    """A PEFT config dict as plain JSON types, as PEFT writes it (sets become sorted lists, enums
    their values): it travels with the group's state and becomes the collected adapter's config."""

    def default(o: Any) -> Any:
        return sorted(o, key=str) if isinstance(o, (set, frozenset)) else str(o)

    return json.loads(json.dumps(value, default=default))
