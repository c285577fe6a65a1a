"""Outer steps: the nodes of one expert average what they learned (DiLoCo over hivemind averaging).

Every member keeps an *anchor* copy of the trainable weights, the same on all members. After H
inner steps it computes the pseudo-gradient ``delta = anchor - weights`` and averages it with the
group through a hivemind ``DecentralizedAverager`` (8-bit blockwise on the wire by default),
weighted by the samples each member processed since its last outer step. Each member then applies
the same outer step to its anchor (SGD with Nesterov momentum) and continues from the new anchor.

hivemind's all-reduce can return a partial average without raising, so every round is checked
(:mod:`cogen.node.wire`); a round that fails the check is not applied: the member keeps its weights
and its next pseudo-gradient simply covers more inner steps.

Drift: members decode slightly different averages (the wire is lossy), so their anchors and
momenta would slowly walk apart. Every ``sync_every`` outer steps they average anchors and momenta
exactly (fp32) with a second averager, which also serves a joining node the group's state.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind import DHT, DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.compression import (
    NoCompression,
)
from hivemind.utils import get_dht_time

from cogen.core.config import GroupConfig
from cogen.core.swarm import GroupStateAverager
from cogen.node.wire import RoundVerifier, all_finite, estimate_bytes_sent, wire_compression
from cogen.protocols import RoundReport

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


class RoundAbandoned(TimeoutError):
    """The node is stopping: the round in flight was left to the other members."""


class GroupAverager:
    """Outer steps of one expert group. Construct in the main thread; ``shutdown()`` when done.

    Once ``stop`` is set, a round in flight is abandoned at once (the others complete it without this
    member), so that a node told to stop saves and exits within its grace period."""

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
        self._samples_at_anchor = 0  # samples behind the anchor: the next round's weight is the rest
        self._pending: _Pending | None = None
        #: what else a peer loading the group's state learns (the node: parameter names, adapter config,
        #: training counters), so the coordinator can turn the state into an expert checkpoint
        self.state_info: dict[str, Any] = {}
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
        self.delta_averager = DecentralizedAverager(
            delta,
            dht,
            prefix=f"{prefix}_delta",
            compression=self.compression,
            allow_state_sharing=False,
            **common,
        )
        try:
            self.state_averager = GroupStateAverager(
                [*self.anchor, *self.momentum], dht, prefix=f"{prefix}_state", compression=NoCompression(),
                state_compression=NoCompression(), metadata=self._state_metadata,
                allow_state_sharing=not dht.client_mode,  # behind NAT nobody can download from this member
                **common,
            )  # fmt: skip
        except BaseException:
            self.delta_averager.shutdown()  # its process would keep this one from exiting
            raise

    @property
    def outer_step(self) -> int:
        return self._outer_step

    @outer_step.setter
    def outer_step(self, value: int) -> None:
        """The outer step, also declared as this member's state-sharing priority, so that a joiner (or
        the coordinator collecting the expert) downloads the state of the most advanced member."""
        self._outer_step = value
        state = getattr(self, "state_averager", None)
        if state is not None and state.allow_state_sharing:
            state.state_sharing_priority = float(value)

    @property
    def _find_group_timeout(self) -> float:
        """How long to look for groupmates before giving up on this round (the all-reduce itself is
        bounded by ``averaging_timeout_s``): a lone or late member goes back to training quickly."""
        return self.cfg.matchmaking_s * 2 + 5.0

    def _run_round(self, averager: DecentralizedAverager, **kwargs: Any) -> Any:
        """One blocking hivemind averaging round (see :meth:`_wait`)."""
        control = averager.step(timeout=self._find_group_timeout, allow_retries=False, wait=False, **kwargs)
        return self._wait(control, time.monotonic() + self._find_group_timeout)

    def _wait(self, control: Any, deadline: float) -> Any:
        """Wait for a round, giving up on matchmaking at ``deadline`` (monotonic time).

        hivemind's own ``timeout`` can overrun by up to the all-reduce timeout when no groupmate
        shows up, so a round still looking for a group after the deadline is cancelled. Raises what
        the round raised; returns the gathered data.
        """
        hard_deadline = deadline + self.cfg.averaging_timeout_s + 10.0  # a dead averager never finishes
        while not control.done():
            # wakes as soon as the round ends (a fixed sleep would add half its length to every round)
            concurrent.futures.wait([control], timeout=0.05)
            if control.done():
                break
            if self.stop.is_set():
                control.cancel()
                raise RoundAbandoned("stopping: the round was abandoned")
            now = time.monotonic()
            if control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and now > deadline:
                control.cancel()
                raise TimeoutError("no groupmates showed up in time")
            if now > hard_deadline:
                control.cancel()
                raise TimeoutError("the averaging round did not finish in time")
        return control.result()

    def _state_metadata(self) -> dict[str, Any]:
        return {**self.state_info, "outer_step": self.outer_step}

    # ---- joining -------------------------------------------------------------------------------------

    def join(self) -> bool:
        """Load the group's anchor, momentum and outer step from a member, if there is one (hivemind
        tries the members in order of their outer step, and the next one if a download breaks off)."""
        logger.info("looking for the group's state (up to %.0f s)", self.cfg.join_timeout_s)
        future = self.state_averager.load_state_from_peers(wait=False, timeout=self.cfg.join_timeout_s)
        deadline = time.monotonic() + self.cfg.join_timeout_s
        try:
            while not self.stop.is_set():  # a stop (SIGTERM) does not wait for a slow or frozen donor
                try:
                    loaded = future.result(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                    break
                except (TimeoutError, concurrent.futures.TimeoutError):
                    if time.monotonic() >= deadline:
                        raise
            else:
                future.cancel()
                return False
        except Exception as e:  # a peer that vanished mid-download, or none answered in time: start fresh
            future.cancel()
            logger.warning("could not load the group's state: %s", e or type(e).__name__)
            return False
        if loaded is None:
            return False
        metadata, tensors = loaded[0], loaded[1]
        n = len(self.anchor)
        if not isinstance(metadata, dict) or len(tensors) != 2 * n or not self._shapes_match(tensors[:n]):
            logger.warning("ignoring a group state that does not match this model")
            return False
        if not all(torch.isfinite(t).all() for t in tensors):
            logger.warning("ignoring a group state with non-finite values")
            return False
        self._set_state(tensors[:n], tensors[n:])
        step = metadata.get("outer_step")
        self.outer_step = int(step) if isinstance(step, int) and step >= 0 else 0
        logger.info("loaded the group's state at outer step %d", self.outer_step)
        return True

    def restore(
        self,
        anchor: Sequence[torch.Tensor],
        momentum: Sequence[torch.Tensor],
        outer_step: int,
        samples_at_anchor: int,
    ) -> None:
        """Put back a saved state (a node resuming from disk): anchor, momentum, outer step, and how many
        of the trainer's samples the anchor holds. The weights become the anchor; raises ``ValueError``
        on a state that does not fit this model or is not finite."""
        if len(anchor) != len(self.anchor) or len(momentum) != len(self.anchor):
            raise ValueError("the saved group state has another number of tensors than this model")
        if not self._shapes_match(anchor) or not self._shapes_match(momentum):
            raise ValueError("the saved group state does not match this model's shapes")
        if not all(torch.isfinite(t).all() for t in [*anchor, *momentum]):
            raise ValueError("the saved group state holds non-finite values")
        self._set_state(anchor, momentum)
        self.outer_step, self._samples_at_anchor = outer_step, samples_at_anchor

    def momentum_state(self) -> list[torch.Tensor]:
        """A copy of the outer momentum."""
        with self.state_averager.get_tensors() as shared:
            return [t.clone() for t in shared[len(self.anchor) :]]

    def state_copy(self, timeout_s: float | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the anchor and the outer momentum, read together (for saving the node's state).

        With ``timeout_s``, raises :class:`TimeoutError` if a round still holds the group's tensors that
        long: hivemind keeps them locked for a whole all-reduce, also one this member just abandoned, and
        a node that is stopping must not wait out the averaging timeout."""
        lock = self.state_averager.lock_averaged_tensors
        if timeout_s is not None:
            if not lock.acquire(timeout=timeout_s):
                raise TimeoutError(f"a round held the group's state for over {timeout_s:.0f} s")
            lock.release()  # free now: nothing starts a round while the node saves
        with self.state_averager.get_tensors() as shared:
            n = len(self.anchor)
            return [t.clone() for t in shared[:n]], [t.clone() for t in shared[n:]]

    @property
    def samples_at_anchor(self) -> int:
        """The trainer's samples the anchor holds; the next round's weight is what came after."""
        return self._samples_at_anchor

    def _shapes_match(self, tensors: Sequence[torch.Tensor]) -> bool:
        return all(t.shape == a.shape for t, a in zip(tensors, self.anchor, strict=True))

    @torch.no_grad()
    def _set_state(self, anchor: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor]) -> None:
        with self.state_averager.get_tensors() as shared:
            for dst, src in zip(shared, [*anchor, *momentum], strict=True):
                dst.copy_(src)
        for p, a in zip(self.params, self.anchor, strict=True):
            p.copy_(a.to(p.device, p.dtype))

    # ---- one outer step ------------------------------------------------------------------------------

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

    def _reset_to_anchor(self) -> None:
        with self.state_averager.get_tensors() as shared:
            for p, a in zip(self.params, shared[: len(self.anchor)], strict=True):
                p.copy_(a.to(p.device, p.dtype))

    def _sync_state(self) -> tuple[float, float | None] | None:
        """Average anchors and momenta exactly, so that the members' lossy decodes do not drift apart.

        Returns this member's anchor drift: how far its anchor was from the group's exact mean, as the
        largest absolute difference and the L2 norm of the difference over the mean's (``None`` when
        the mean is zero); ``None`` when no sync took place.
        """
        before = self.anchor_state()
        try:
            done = self._run_round(self.state_averager)
        except Exception as e:
            logger.warning(
                "state sync at outer step %d failed (%s); will retry next time", self.outer_step, e
            )
            return None
        if not done:
            return None
        self._reset_to_anchor()
        largest, sq_diff, sq_norm = 0.0, 0.0, 0.0
        with self.state_averager.get_tensors() as shared:
            for b, a in zip(before, shared[: len(self.anchor)], strict=True):
                if b.numel() == 0:
                    continue
                diff = b.sub_(a)  # in place: ``before`` is this method's own copy
                largest = max(largest, torch.linalg.vector_norm(diff, ord=math.inf).item())
                sq_diff += torch.linalg.vector_norm(diff, dtype=torch.float64).item() ** 2
                sq_norm += torch.linalg.vector_norm(a, dtype=torch.float64).item() ** 2
        relative = math.sqrt(sq_diff / sq_norm) if sq_norm > 0 else None
        if not math.isfinite(largest) or (relative is not None and not math.isfinite(relative)):
            logger.warning("state sync at outer step %d: the drift is not finite", self.outer_step)
            return None
        logger.info(
            "state sync at outer step %d | group of %d | anchor drift max %.3g, relative %s",
            self.outer_step, len(done), largest, "n/a" if relative is None else f"{relative:.3g}",
        )  # fmt: skip
        return largest, relative

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

    def anchor_state(self) -> list[torch.Tensor]:
        """A copy of the anchor weights (for tests and drift reports)."""
        with self.state_averager.get_tensors() as shared:
            return [t.clone() for t in shared[: len(self.anchor)]]

    def shutdown(self) -> None:
        if self._pending is not None:  # leave a round in flight: the others complete it without us
            self._pending.control.cancel()
            self._pending = None
        for averager in (self.delta_averager, self.state_averager):
            if averager.is_alive():
                averager.shutdown()
