"""Outer steps: the nodes of one expert average what they learned (DiLoCo over hivemind averaging).

Every member keeps an *anchor* copy of the trainable weights, the same on all members. After H
inner steps it computes the pseudo-gradient ``delta = anchor - weights`` and averages it with the
group through a hivemind ``DecentralizedAverager`` (8-bit blockwise on the wire by default),
weighted by the samples each member processed since its last outer step. Each member then applies
the same outer step to its anchor (SGD with Nesterov momentum) and continues from the new anchor.

With ``--aggregator mean`` the average is hivemind's butterfly all-reduce; with ``trimmed_mean`` or
``centered_clip``, or with ``--compression sparse`` (whose members keep different positions), the
members exchange their whole deltas and each computes the same aggregate
(:mod:`cogen.node.rounds`, :mod:`cogen.node.aggregators`, :mod:`cogen.node.codecs`). Either way
every round is checked: a partial all-reduce or a missing delta, an update or a claim that the
group's checks reject (:mod:`cogen.node.screening`: update norms against the group's median, capped
weights, the median step), and a round that fails is not applied: the member keeps its weights and
its next pseudo-gradient simply covers more inner steps. Members rejected repeatedly are excluded for a while
and named in every round report.

Every ``sync_every`` outer steps the members also average anchors and momenta exactly with a second
averager, which serves a joining node the group's state: :mod:`cogen.node.group_state`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind import DHT
from hivemind.compression import NoCompression

from cogen.core.averagers import GroupStateAverager
from cogen.core.config import GroupConfig
from cogen.node.aggregators import get_aggregator
from cogen.node.exchange import RoundExchange
from cogen.node.group_state import GroupState
from cogen.node.robust_rounds import ExchangeRounds
from cogen.node.rounds import ButterflyRounds, Outcome, Started, averager_options, round_report
from cogen.node.screening import Exclusions, group_step
from cogen.node.wire import wire_compression
from cogen.protocols import RoundReport
from cogen.protocols.keys import exchange_name, state_prefix

logger = logging.getLogger(__name__)
LINGER_S = 5.0  # how long a member that leaves keeps serving its last round to its groupmates, at most


@dataclass
class _Pending:
    """A round in flight."""

    started: Started
    start: float
    weight: float
    total_samples: int
    snapshot: list[torch.Tensor] | None  # the weights when it started, to keep the progress made since
    prepare_s: float = 0.0  # cogen's own work before the round: pseudo-gradient, finiteness, checks


class GroupAverager(GroupState):
    """Outer steps of one expert group. Construct in the main thread; ``shutdown()`` when done.

    Once ``stop`` is set, a round in flight is abandoned at once (the others complete it without this
    member), so that a node told to stop saves and exits within its grace period.

    Some 215 lines, a little over the ~200 the project aims for: a round's begin, finish, apply and
    report share the round in flight and the averagers' tensor locks, so they stay in one class."""

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        params: Sequence[torch.nn.Parameter],
        cfg: GroupConfig,
        stop: threading.Event | None = None,
    ):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.params = list(params)
        self._outer_step = 0
        self.rounds_ok = 0
        self.rounds_failed = 0
        self.last_round: RoundReport | None = None
        self._samples_at_anchor = 0
        self._anchor_time = time.monotonic()
        self._pending: _Pending | None = None
        self.state_info = None
        with torch.no_grad():
            self.anchor = [p.detach().float().cpu().clone() for p in self.params]
            self.momentum = [torch.zeros_like(a) for a in self.anchor]
        common = averager_options(cfg)
        self.exclusions = Exclusions(cfg.reject_limit, cfg.exclude_s)
        self.exchange, self.rounds = open_rounds(dht, prefix, self.anchor, cfg, self.exclusions, common)
        try:
            self.state_averager = GroupStateAverager(
                [*self.anchor, *self.momentum], dht, prefix=state_prefix(prefix), compression=NoCompression(),
                state_compression=NoCompression(), metadata=self._state_metadata,
                allow_state_sharing=not dht.client_mode,  # behind NAT nobody can download from this member
                **common,
            )  # fmt: skip
        except BaseException:
            self.rounds.averager.shutdown()  # its process would keep this one from exiting
            self.exchange.stop()
            raise

    @property
    def delta_averager(self) -> Any:
        """The hivemind averager that forms this group's rounds (and, for ``mean``, averages)."""
        return self.rounds.averager

    @torch.no_grad()
    def outer_step_now(self, total_samples: int) -> RoundReport:
        """Average the pseudo-gradient with the group and apply the outer step now (blocking)."""
        landed = self.finish_round()  # a round still in flight from overlapped mode comes first
        if landed is not None and total_samples <= self._samples_at_anchor:
            return landed  # nothing trained since it started: no empty round after it
        if self.begin_round(total_samples, keep_progress=False):
            report = self.finish_round()
            assert report is not None
            return report
        assert self.last_round is not None  # begin_round reported why it did not start
        return self.last_round

    def has_unaveraged(self, total_samples: int) -> bool:
        """Whether the weights hold progress the group has not averaged yet (or a round is in flight)."""
        return self._pending is not None or total_samples > self._samples_at_anchor

    @torch.no_grad()
    def begin_round(self, total_samples: int, keep_progress: bool = True) -> bool:
        """Start averaging the pseudo-gradient in the background; training may go on meanwhile.

        With ``keep_progress``, the inner steps taken while the round runs are kept: when it is
        applied, the weights become the new anchor plus that progress (a one-round-delayed outer
        step), and the progress counts in the next round. Returns whether a round was started.
        """
        start = time.monotonic()
        weight = float(total_samples - self._samples_at_anchor)

        write = functools.partial(_pseudo_gradient, self.anchor, self.params)
        fields = {"step": self.outer_step, "weight": weight, "elapsed_s": start - self._anchor_time}
        snapshot = None
        if keep_progress:
            snapshot = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        started = self.rounds.start(write, fields, self._find_group_timeout)
        if started is None:
            self._reset_to_anchor()
            self._samples_at_anchor, self._anchor_time = total_samples, time.monotonic()
            self._report(False, "non-finite pseudo-gradient: left out of the round", 0, start, weight)
            return False
        prepare_s = time.monotonic() - start
        self._pending = _Pending(started, start, weight, total_samples, snapshot, prepare_s)
        return True

    @torch.no_grad()
    def finish_round(self) -> RoundReport | None:
        """Wait for the round in flight, verify it and apply it (or leave it); ``None`` if none was."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        start, weight = pending.start, pending.weight
        try:
            gathered = self._wait(pending.started.control, start + self._find_group_timeout)
        except TimeoutError as e:
            return self._report(False, str(e), 0, start, weight)
        except Exception as e:  # hivemind raises its own exception types when a round breaks
            return self._report(False, f"averaging failed: {type(e).__name__}", 0, start, weight)
        if not gathered:
            return self._report(False, "no group formed", 0, start, weight)
        averaged_at = time.monotonic()

        def apply(delta: Sequence[torch.Tensor]) -> None:
            progress = pending.snapshot
            if progress is not None:  # the snapshot becomes the progress made since: weights - snapshot
                for s, p in zip(progress, self.params, strict=True):
                    s.neg_().add_(p.detach().to("cpu", torch.float32))
            self._apply(delta, progress)
            self._samples_at_anchor, self._anchor_time = pending.total_samples, time.monotonic()

        outcome = self.rounds.finish(pending.started, gathered, apply)
        own_s = pending.prepare_s, time.monotonic() - averaged_at
        logger.debug(
            "round of %d: cogen's own work %.3f s before and %.3f s after hivemind's averaging (%.3f s)",
            len(gathered), *own_s, averaged_at - start - own_s[0],
        )  # fmt: skip
        if outcome.problem is not None:
            return self._report(False, outcome.problem, outcome.group_size, start, weight, outcome)
        return self._advance(outcome, start, weight)

    def _advance(self, outcome: Outcome, start: float, weight: float) -> RoundReport:
        """After an applied round: the group's outer step (the median claim, see
        :mod:`cogen.node.screening`), loading the group's state if this member was behind, the sync."""
        claims = {p: c for p, c in outcome.screened.claims.items() if not self.exclusions.is_excluded(p)}
        step = group_step(claims)
        behind = step > self.outer_step
        self.outer_step = step + 1
        report = self._report(True, "", outcome.group_size, start, weight, outcome)
        if behind:
            logger.info("this member was behind the group; loading the group's state")
            self.join(max_step=self.outer_step)
        elif self.outer_step % self.cfg.sync_every == 0:
            drift = self._sync_state()
            if drift is not None:  # the report of the round that synced says how far apart members were
                report = self.last_round = RoundReport.model_validate(
                    {**report.model_dump(), "drift": drift[0], "drift_relative": drift[1]}
                )
        return report

    def _apply(
        self, delta_avg: Sequence[torch.Tensor], progress: Sequence[torch.Tensor] | None = None
    ) -> None:
        """Nesterov SGD on the anchor with the averaged pseudo-gradient; every member does the same.
        The weights become the new anchor, plus ``progress`` made while the round ran (if any; its
        tensors are overwritten). In place: no tensor-sized temporaries at large models."""
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        with self.state_averager.get_tensors() as shared:
            n = len(self.anchor)
            for i, (a, m, d, p) in enumerate(
                zip(shared[:n], shared[n:], delta_avg, self.params, strict=True)
            ):
                torch.add(d, m, alpha=mu, out=m)  # m = mu * m + d, in one pass
                a.sub_(d, alpha=lr).sub_(m, alpha=lr * mu)  # a -= lr * (d + mu * m), in place
                if progress is None:
                    p.copy_(a)
                else:
                    p.copy_(progress[i].add_(a))  # ``progress`` is a temporary of this round: reused

    def _report(self, ok: bool, reason: str, group_size: int, start: float, weight: float,
                outcome: Outcome | None = None) -> RoundReport:  # fmt: skip
        if ok:
            self.rounds_ok += 1
        else:
            self.rounds_failed += 1
            logger.warning("outer step %d not applied: %s", self.outer_step, reason)
        # from the shapes alone: the averager may still hold its tensors' lock in a round just abandoned
        sent = self.rounds.bytes_sent(group_size)
        self.last_round = round_report(
            self.outer_step, ok, reason, group_size, time.monotonic() - start, sent, weight,
            sorted(outcome.screened.rejected) if outcome is not None else [], self.exclusions.excluded(),
        )  # fmt: skip
        return self.last_round

    @torch.no_grad()
    def absorb_local(self, total_samples: int) -> None:
        """A member with nobody to average with makes its own progress the group's state (an outer
        step of a group of one with lr 1): a node that joins later, and the coordinator collecting the
        expert, load these weights instead of a stale anchor."""
        self.finish_round()
        with self.state_averager.get_tensors() as shared:
            for a, p in zip(shared[: len(self.anchor)], self.params, strict=True):
                a.copy_(p.detach().float().cpu())
        self._samples_at_anchor, self._anchor_time = total_samples, time.monotonic()
        self.outer_step += 1

    def shutdown(self) -> None:
        if self._pending is not None:  # leave a round in flight: the others complete it without us
            self._pending.started.control.cancel()
            self._pending = None
        # the last round's groupmates may still fetch what this member served of it (not when stopping)
        self.exchange.stop(linger_s=0.0 if self.stop.is_set() else LINGER_S)
        alive = [a for a in (self.delta_averager, self.state_averager) if a.is_alive()]
        if alive:  # side by side: each may wait out its shutdown timeout, and the grace period counts both
            with concurrent.futures.ThreadPoolExecutor(len(alive), thread_name_prefix="stop") as pool:
                list(pool.map(lambda averager: averager.shutdown(), alive))


def open_rounds(
    dht: DHT, prefix: str, anchor: Sequence[torch.Tensor], cfg: GroupConfig, exclusions: Exclusions,
    common: dict[str, Any],
) -> tuple[RoundExchange, ButterflyRounds | ExchangeRounds]:  # fmt: skip
    """The round exchange (started) and the rounds of ``cfg.aggregator``'s kind."""
    limit = sum(4 * a.numel() + 4096 for a in anchor) + 65536  # a delta's fp32 size, plus headers
    exchange = RoundExchange(dht, exchange_name(prefix), max_bytes=limit, wait_s=cfg.averaging_timeout_s)
    exchange.start()
    whole = get_aggregator(cfg.aggregator).needs_all_deltas or cfg.compression == "sparse"
    kind = ExchangeRounds if whole else ButterflyRounds
    compression = wire_compression(cfg.compression, cfg.compression_threshold)
    try:
        return exchange, kind(dht, prefix, anchor, cfg, compression, exchange, exclusions, **common)
    except BaseException:
        exchange.stop()
        raise


def _pseudo_gradient(
    anchor: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter], out: list[torch.Tensor]
) -> None:
    """``out = anchor - weights``, in place."""
    for d, a, p in zip(out, anchor, params, strict=True):
        torch.sub(a, p.detach().to("cpu", torch.float32), out=d)
