"""The group's shared state as one member holds it: joining, resuming, copies, and the exact sync.

Every member keeps the group's *anchor* (the trainable weights all members agree on) and the outer
momentum in a :class:`~cogen.core.swarm.GroupStateAverager`, which also serves them, with the outer
step, to a joining node (:meth:`GroupState.join`) and to the coordinator collecting the expert. A
node resuming from disk puts its saved state back (:meth:`GroupState.restore`) and saves copies
(:meth:`GroupState.state_copy`).

Drift: members decode slightly different averages (the wire is lossy), so their anchors and
momenta would slowly walk apart. Every ``sync_every`` outer steps they average anchors and momenta
exactly (fp32) with that averager (:meth:`GroupState._sync_state`), which reports how far apart they were.

Rounds on either averager are waited for by :meth:`GroupState._wait`: bounded, and abandoned at once
when the node stops.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from hivemind import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

from cogen.core.config import GroupConfig
from cogen.core.swarm import GroupStateAverager
from cogen.node.screening import STEP_SLACK
from cogen.protocols import GroupStateInfo

logger = logging.getLogger(__name__)


class RoundAbandoned(TimeoutError):
    """The node is stopping: the round in flight was left to the other members."""


class GroupState:
    """One member's share of the group's state; :class:`~cogen.node.group.GroupAverager` sets up the
    attributes below and adds the outer steps.

    Some 220 lines, over the ~200 the project aims for, on purpose: every method here reads or writes
    the tensors of the one state averager under its lock (join, restore, copies, the exact sync), and
    keeping them in one class keeps that lock's discipline in one place."""

    cfg: GroupConfig
    stop: threading.Event
    params: list[torch.nn.Parameter]
    anchor: list[torch.Tensor]  # the anchor's shapes (the shared copy lives in ``state_averager``)
    state_averager: GroupStateAverager
    #: what else a peer loading the group's state learns (the node: parameter names, adapter config,
    #: training counters), so the coordinator can turn the state into an expert checkpoint
    state_info: GroupStateInfo | None
    _outer_step: int
    _samples_at_anchor: int  # samples behind the anchor: the next round's weight is the rest

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
        """What a peer loading the state gets besides the tensors: :attr:`state_info` at this outer step."""
        if self.state_info is None:
            return {"outer_step": self.outer_step}
        return self.state_info.model_copy(update={"outer_step": self.outer_step}).to_wire()

    # ---- joining and resuming --------------------------------------------------------------------

    def join(self, max_step: int | None = None) -> bool:
        """Load the group's anchor, momentum and outer step from a member, if there is one (hivemind
        tries the members in order of their outer step, and the next one if a download breaks off).

        ``max_step``: the group's outer step as its last round's members agreed on it; a state that
        claims to be further ahead is not loaded (hivemind picks the donor by a priority each peer
        declares for itself, so a state far ahead of the group is a peer's claim, not the group's)."""
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
        step = metadata.get("outer_step")
        step = int(step) if isinstance(step, int) and step >= 0 else 0
        if max_step is not None and step > max_step + STEP_SLACK:
            logger.warning("ignoring a group state at outer step %d: the group is at %d", step, max_step)
            return False
        self._set_state(tensors[:n], tensors[n:])
        self.outer_step = step
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

    def anchor_state(self) -> list[torch.Tensor]:
        """A copy of the anchor weights (for tests and drift reports)."""
        with self.state_averager.get_tensors() as shared:
            return [t.clone() for t in shared[: len(self.anchor)]]
