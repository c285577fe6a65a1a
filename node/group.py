"""Outer steps: the nodes of one expert average what they learned (DiLoCo over hivemind averaging).

Every member keeps an *anchor* copy of the trainable weights, the same on all members. After H
inner steps it computes the pseudo-gradient ``delta = anchor - weights`` and averages it with the
group through a hivemind ``DecentralizedAverager`` (8-bit blockwise on the wire by default),
weighted by the samples each member processed since its last outer step. Each member then applies
the same outer step to its anchor (SGD with Nesterov momentum) and continues from the new anchor.

hivemind's all-reduce can return a partial average without raising, so every round is checked
(:mod:`cogen.node.wire`); a round that fails the check is not applied: the member keeps its weights
and its next pseudo-gradient simply covers more inner steps.

Every ``sync_every`` outer steps the members also average anchors and momenta exactly with a second
averager, which serves a joining node the group's state: :mod:`cogen.node.group_state`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind import DHT
from hivemind.compression import NoCompression
from hivemind.utils import get_dht_time

from cogen.core.averagers import GroupStateAverager, MemberAverager
from cogen.core.config import GroupConfig
from cogen.node.group_state import GroupState
from cogen.node.wire import RoundVerifier, all_finite, estimate_bytes_sent, wire_compression
from cogen.protocols import RoundReport
from cogen.protocols.keys import delta_prefix, state_prefix

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A round in flight."""

    control: Any  # hivemind StepControl
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
        self._pending: _Pending | None = None
        self.state_info = None
        self.compression = wire_compression(cfg.compression, cfg.compression_threshold)
        with torch.no_grad():
            self.anchor = [p.detach().float().cpu().clone() for p in self.params]
            self.momentum = [torch.zeros_like(a) for a in self.anchor]
            delta = [torch.zeros_like(a) for a in self.anchor]
        self.verifier = RoundVerifier(self.anchor, cfg.compression)
        common: dict[str, Any] = dict(
            target_group_size=cfg.group_size,
            min_group_size=2,
            min_matchmaking_time=cfg.matchmaking_s,
            request_timeout=cfg.matchmaking_s / 2,
            allreduce_timeout=cfg.averaging_timeout_s,
            next_chunk_timeout=min(30.0, cfg.averaging_timeout_s),
            start=True,
        )
        self.delta_averager = MemberAverager(  # admits members only in a permissioned swarm
            delta,
            dht,
            prefix=delta_prefix(prefix),
            compression=self.compression,
            allow_state_sharing=False,
            **common,
        )
        try:
            self.state_averager = GroupStateAverager(
                [*self.anchor, *self.momentum], dht, prefix=state_prefix(prefix), compression=NoCompression(),
                state_compression=NoCompression(), metadata=self._state_metadata,
                allow_state_sharing=not dht.client_mode,  # behind NAT nobody can download from this member
                **common,
            )  # fmt: skip
        except BaseException:
            self.delta_averager.shutdown()  # its process would keep this one from exiting
            raise

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
        with self.delta_averager.get_tensors() as delta:
            for d, a, p in zip(delta, self.anchor, self.params, strict=True):
                torch.sub(a, p.detach().to("cpu", torch.float32), out=d)
            finite = all_finite(delta)
            checks = self.verifier.checks(delta) if finite else None
        if checks is None:
            self._reset_to_anchor()
            self._samples_at_anchor = total_samples
            self._report(False, "non-finite pseudo-gradient: left out of the round", 0, start, weight)
            return False
        gather = {
            "step": self.outer_step,
            "weight": weight,
            "proj": checks.projections,
            "sq": checks.sq_norms,
        }
        snapshot = None
        if keep_progress:
            snapshot = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        prepare_s = time.monotonic() - start
        control = self.delta_averager.step(
            gather=gather, weight=max(weight, 1e-6), timeout=self._find_group_timeout, allow_retries=False,
            wait=False,
        )  # fmt: skip
        self._pending = _Pending(control, start, weight, total_samples, snapshot, prepare_s)
        return True

    @torch.no_grad()
    def finish_round(self) -> RoundReport | None:
        """Wait for the round in flight, verify it and apply it (or leave it); ``None`` if none was."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        start, weight = pending.start, pending.weight
        try:
            gathered = self._wait(pending.control, start + self._find_group_timeout)
        except TimeoutError as e:
            return self._report(False, str(e), 0, start, weight)
        except Exception as e:  # hivemind raises its own exception types when a round breaks
            return self._report(False, f"averaging failed: {type(e).__name__}", 0, start, weight)
        if not gathered:
            return self._report(False, "no group formed", 0, start, weight)
        averaged_at = time.monotonic()
        with self.delta_averager.get_tensors() as delta:
            problem = self.verifier.verify(delta, list(gathered.values()))
            if problem is None:
                progress = pending.snapshot
                if progress is not None:  # the snapshot becomes the progress made since: weights - snapshot
                    for s, p in zip(progress, self.params, strict=True):
                        s.neg_().add_(p.detach().to("cpu", torch.float32))
                self._apply(delta, progress)
                self._samples_at_anchor = pending.total_samples
        group_size = len(gathered)
        own_s = pending.prepare_s, time.monotonic() - averaged_at
        logger.debug(
            "round of %d: cogen's own work %.3f s before and %.3f s after hivemind's averaging (%.3f s)",
            group_size, *own_s, averaged_at - start - own_s[0],
        )  # fmt: skip
        if problem is not None:
            return self._report(False, problem, group_size, start, weight)
        steps = [
            g["step"] for g in gathered.values() if isinstance(g, dict) and isinstance(g.get("step"), int)
        ]
        behind = bool(steps) and max(steps) > self.outer_step
        self.outer_step = max([self.outer_step, *steps]) + 1
        report = self._report(True, "", group_size, start, weight)
        if behind:
            logger.info("this member was behind the group; loading the group's state")
            self.join()
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

    def _report(self, ok: bool, reason: str, group_size: int, start: float, weight: float) -> RoundReport:
        if ok:
            self.rounds_ok += 1
        else:
            self.rounds_failed += 1
            logger.warning("outer step %d not applied: %s", self.outer_step, reason)
        # from the shapes alone: the averager may still hold its tensors' lock in a round just abandoned
        sent = estimate_bytes_sent(self.anchor, self.compression, group_size)
        self.last_round = RoundReport(
            outer_step=self.outer_step, ok=ok, reason=reason[:200], group_size=group_size,
            duration_s=time.monotonic() - start, bytes_sent=sent, weight=float(weight), time=get_dht_time(),
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
        self._samples_at_anchor = total_samples
        self.outer_step += 1

    def shutdown(self) -> None:
        if self._pending is not None:  # leave a round in flight: the others complete it without us
            self._pending.control.cancel()
            self._pending = None
        alive = [a for a in (self.delta_averager, self.state_averager) if a.is_alive()]
        if alive:  # side by side: each may wait out its shutdown timeout, and the grace period counts both
            with concurrent.futures.ThreadPoolExecutor(len(alive), thread_name_prefix="stop") as pool:
                list(pool.map(lambda averager: averager.shutdown(), alive))
