"""When a generation ends, decided from records that no single peer can steer.

A generation ends after ``generation_s`` seconds, or once every expert group on the current base has
made ``generation_outer_steps`` outer steps (both configured: whichever comes first). Groups announce
their outer steps in :class:`GroupProgress` records, and any peer can write records, so
:class:`GenerationSchedule` believes a claim only when

- it is **consistent with its group**: its owner also announces itself (:class:`NodeInfo`, same owner
  key, same peer id) as a member of that expert on this generation, not stopping, on the swarm's base
  (a node on a foreign model, :mod:`cogen.node.foreign`, is not a member);
- it is **possible**: an outer step takes at least ``min_outer_step_s``, so a claim of more outer
  steps than the generation's age allows is refused (a huge ``outer_step`` cannot end a generation);

and it counts a group that lags behind only while **its state answers**: such a group is probed by
downloading its state (:func:`cogen.coordinator.collect.download_state`, what collecting does), and one
whose state nobody serves is left out (after two failed probes in a row: one may be a busy group),
so an announced expert that never trains cannot hold a generation forever. A probe's verdict is kept
for a while (a failure: with backoff) so that probing never floods the swarm. Whatever the claims
say, the states collected at the end must show the outer steps themselves (:meth:`Due.short_of`),
else nothing is merged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cogen.coordinator.collect import CollectError, download_state
from cogen.coordinator.config import ScheduleConfig
from cogen.coordinator.foreign import is_foreign
from cogen.core.backoff import Backoff
from cogen.core.swarm import SwarmClient, owner_fingerprint
from cogen.protocols import GroupProgress, GroupStateInfo, NodeInfo

logger = logging.getLogger(__name__)

#: a probe: the state ``expert``'s group serves on ``generation`` (raises CollectError when none answers)
Probe = Callable[[str, int], GroupStateInfo]


@dataclass(frozen=True)
class Due:
    """A generation that is due: the experts to collect and, by the outer-steps rule, the outer step
    each collected state must have reached (``None``: ended by time)."""

    experts: list[str]
    outer_steps: int | None = None

    def short_of(self, info: GroupStateInfo) -> bool:
        """Whether a collected state falls short of the outer steps its group claimed."""
        return self.outer_steps is not None and info.outer_step < self.outer_steps


@dataclass
class _Verdict:
    """The last probe of one group: the outer step its state showed (``None``: nobody answered)."""

    outer_step: int | None
    until: float
    backoff: Backoff


class GenerationSchedule:
    """Decides whether the current generation is due (see the module docstring). Runs in the
    coordinator's main thread: a probe downloads a group's state through a hivemind averager."""

    PROBE_RETRY_S = 5.0  #: first wait before a group whose state did not answer is probed again (doubling)
    PROBE_RETRY_CAP_S = 600.0
    PROBE_KEEP_S = 60.0  #: how long the outer step a group's state showed is trusted before a new probe
    PROBES_TO_LEAVE_OUT = 2  #: failed probes in a row after which a group no longer holds the generation

    def __init__(
        self,
        client: SwarmClient,
        cfg: ScheduleConfig,
        probe: Probe | None = None,
        model_sha256: str | None = None,
    ):
        self.client = client
        self.cfg = cfg
        self.model_sha256 = model_sha256  # the swarm's base: nodes on another model are foreign, not members
        self.probe = probe or self._download
        self.generation = 0
        self.started = time.monotonic()
        self._verdicts: dict[str, _Verdict] = {}
        self._refused: set[bytes] = set()  # owners whose impossible claims were logged this generation

    def begin(self, generation: int, age_s: float = 0.0) -> None:
        """A new generation started ``age_s`` seconds ago: its clock and its probes start over."""
        self.generation, self.started = generation, time.monotonic() - max(0.0, age_s)
        self._verdicts.clear()
        self._refused.clear()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.started

    def members(self) -> dict[str, dict[bytes, str]]:
        """expert -> {owner key: peer id} of the nodes announcing it on this generation (not stopping)."""
        out: dict[str, dict[bytes, str]] = {}
        for entry in self.client.fetch(NodeInfo):
            r = entry.record
            if (
                r.generation == self.generation
                and r.state != "stopping"
                and not is_foreign(r, self.model_sha256)
            ):
                out.setdefault(r.expert, {})[entry.owner] = r.peer_id
        return out

    def experts(self) -> list[str]:
        """Experts with a node on the current generation's base."""
        return sorted(self.members())

    def claims(self, members: dict[str, dict[bytes, str]]) -> dict[str, int]:
        """expert -> the highest believable outer step its group's members claim."""
        possible = int(self.age_s / self.cfg.min_outer_step_s)
        steps: dict[str, int] = {}
        for entry in self.client.fetch(GroupProgress):
            r = entry.record
            if r.generation != self.generation or members.get(r.expert, {}).get(entry.owner) != r.peer_id:
                continue  # not a member of that group on this generation (or not under its own peer id)
            if r.outer_step > possible:
                if entry.owner not in self._refused and len(self._refused) < 1024:
                    self._refused.add(entry.owner)
                    logger.warning(
                        "not believing %s's claim of %d outer steps for %r: generation %d is %.0f s old",
                        owner_fingerprint(entry.owner), r.outer_step, r.expert, self.generation, self.age_s,
                    )  # fmt: skip
                continue
            steps[r.expert] = max(steps.get(r.expert, 0), r.outer_step)
        return steps

    def due(self) -> Due | None:
        """The generation's end, if it is due now; ``None`` while it goes on."""
        if self.cfg.generation_s is not None and self.age_s >= self.cfg.generation_s:
            experts = self.experts()
            return Due(experts) if experts else None
        target = self.cfg.generation_outer_steps
        if target is None:
            return None
        members = self.members()
        steps = self.claims(members)
        done = [e for e in sorted(members) if steps.get(e, 0) >= target]
        if not done:
            return None
        behind = [e for e in sorted(members) if e not in done]
        for expert in behind:
            shown = self._state_step(expert)
            if shown is None and self._verdicts[expert].backoff.failures >= self.PROBES_TO_LEAVE_OUT:
                continue  # nobody serves this group's state: it does not hold the generation
            if shown is None:
                return None  # one failed probe may be a busy group: wait for the next
            if shown < target:
                return None  # a real group that is not there yet
            done.append(expert)
        return Due(sorted(done), target)

    def _state_step(self, expert: str) -> int | None:
        """The outer step ``expert``'s group state shows, probed at most every so often."""
        now = time.monotonic()
        verdict = self._verdicts.get(expert)
        if verdict is not None and now < verdict.until:
            return verdict.outer_step
        verdict = verdict or _Verdict(None, now, Backoff(self.PROBE_RETRY_S, self.PROBE_RETRY_CAP_S))
        try:
            verdict.outer_step = self.probe(expert, self.generation).outer_step
            verdict.backoff.succeeded()
            verdict.until = now + self.PROBE_KEEP_S
        except CollectError as e:
            verdict.outer_step = None
            verdict.until = now + verdict.backoff.failed()
            logger.info("leaving %r out of the generation's end: %s", expert, e)
        self._verdicts[expert] = verdict
        return verdict.outer_step

    def _download(self, expert: str, generation: int) -> GroupStateInfo:
        timeout = min(self.cfg.collect_timeout_s, 30.0)
        return download_state(self.client, expert, generation, timeout)[0]
