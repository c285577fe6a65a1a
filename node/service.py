"""``ExpertNode``: a volunteer that joins the swarm and trains its domain expert.

run() = join the DHT -> check the swarm's protocol -> load the 8-bit base + LoRA -> claim a data
shard -> inner steps, with one summary line and one signed TrainingProgress record per interval ->
on stop (max steps, max time, SIGTERM/Ctrl+C) save the adapter atomically and leave.

Generations: a :class:`BaseFollower` fetches and verifies each newer base the coordinator publishes;
at its next outer step the node saves its expert of the old generation, loads the new base with a
fresh adapter and joins its group's averaging for the new generation (the averagers' prefixes carry
the generation, so members on different bases never average together). The data stream goes on.

This module holds the node's lifecycle; its concerns are layers below it (:mod:`cogen.node.state`):
records and summaries (:mod:`~cogen.node.announcing`), the base and the group
(:mod:`~cogen.node.switching`) and the training loop (:mod:`~cogen.node.training`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path

import torch
from prefetch_generator import BackgroundGenerator

from cogen.core import models
from cogen.core.compatibility import check_compatible
from cogen.core.config import NodeConfig
from cogen.core.corpora import get_corpus
from cogen.core.data import TrainStream
from cogen.core.exit_codes import CommandError, ExitCode
from cogen.core.model_identity import ModelIdentity
from cogen.core.swarm import SwarmClient
from cogen.node.follow import generation_of
from cogen.node.hardware import detect_hardware
from cogen.node.health import NodeHealth
from cogen.node.metrics import NodeMetrics
from cogen.node.reporting import LossWindow, NodeReporter
from cogen.node.resume import batches_to_skip, data_fingerprint, find_state
from cogen.node.shards import claim_shard
from cogen.node.trainer import ExpertTrainer
from cogen.node.training import NodeResult, TrainingLoop
from cogen.node.trust import KeyTrust
from cogen.protocols.names import is_name, slug

logger = logging.getLogger(__name__)


class DataError(RuntimeError, CommandError):
    """The expert's domain data cannot be read (one-line explanation)."""

    exit_code = ExitCode.DATA
    what = "data"


def expert_name(expert: str) -> str:
    """The expert's name on the wire: the domain name, or a slug of a data directory's name."""
    return expert if is_name(expert) else slug(Path(expert).name, "custom")


class ExpertNode(TrainingLoop):
    """Trains one expert; ``stop()`` (or the stop Event) ends it cleanly, saving the adapter.

    Its concerns are the layers it inherits, one module each (:mod:`cogen.node.state`)."""

    def __init__(self, cfg: NodeConfig, stop_event: threading.Event | None = None):
        self.cfg = cfg
        self.stop_event = stop_event or threading.Event()
        self.expert = expert_name(cfg.data.expert)
        self.started_at = time.time()
        self.client = None
        self.shard = 0
        self.losses = LossWindow()  # inner steps since the last summary; first and last loss of this base
        self.reporter = None
        self.group = None
        self._alone_logged = False
        self.metrics = None
        self.metrics_url = None
        self.generation = 0
        self.base_name = cfg.model.model
        self.base_id = self.base_label = cfg.model.model  # identity (for resuming) and name (announced)
        self._data_fingerprint = ""  # what the data stream depends on besides the shard (for resuming)
        self._saved_outer = None  # the outer step of the last saved training state
        self._saved_at = (-1, None)  # (inner, outer step) of the last save
        self.follower = None
        self.identity = ModelIdentity()
        self.foreign = False

    def stop(self) -> None:
        self.stop_event.set()

    def is_running(self) -> bool:
        return self.client is not None and not self.stop_event.is_set()

    def run(self) -> NodeResult:
        cfg = self.cfg
        self.trust = KeyTrust.from_config(
            cfg.trusted_key, cfg.output_dir, cfg.network.swarm
        )  # a bad key: exit 2 at once
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model_path = models.resolve_model(cfg.model.model, cfg.model.cache.cache_dir)
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
            check_compatible(client, self.trust.key)  # a key given or pinned: only its coordinator
            logger.info(
                "joined swarm %r as %s; visible at %s",
                cfg.network.swarm,
                client.peer_id,
                " ".join(client.visible_maddrs()),
            )
            self.hardware = detect_hardware(device)
            self.foreign = self._foreign_base(model_path)
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
                source = TrainStream(
                    corpus, tokenizer, block_size=cfg.data.block_size, batch_size=cfg.data.batch_size,
                    shard=self.shard, num_shards=cfg.data.num_shards, seed=cfg.data.seed,
                    validation_fraction=cfg.data.validation_fraction,
                )  # fmt: skip
            except ValueError as e:
                raise DataError(str(e)) from None
            batches = BackgroundGenerator(itertools.islice(source, skip, None), max_prefetch=4)
            trainer = ExpertTrainer(
                model, optimizer, scheduler, batches, max_grad_norm=cfg.optim.max_grad_norm,
                row_sources=source.row_sources, repeats=source.repeats,
            )  # fmt: skip
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
