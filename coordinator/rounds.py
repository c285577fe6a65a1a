"""The expert groups' averaging rounds as the monitor shows them: each round once, the last ones, totals.

Nodes report their group's latest round in their ``groups`` records; every member of a group reports
the same round, so :meth:`RoundBook.unseen` lets a round through once per (expert, generation, outer
step, result), as its first reporting member saw it (a group's outer steps start again at each
generation). :meth:`RoundBook.add` keeps the last rounds and the totals per expert, and writes each
new round to the :class:`~cogen.coordinator.history.History` file, from which :meth:`RoundBook.load`
reads them back on start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from cogen.coordinator.history import History, RoundRow
from cogen.coordinator.schemas import RoundSummary
from cogen.core.swarm import Entry
from cogen.protocols.records import GroupProgress, RoundReport

ROUNDS_KEPT = 50  #: rounds per expert kept in memory (the last one is the group's current state)


class RoundBook:
    """Averaging rounds per expert. Not thread-safe: the monitor calls it under its own lock."""

    def __init__(self, history: History | None = None):
        self.history = history
        self._rounds: dict[str, deque[RoundSummary]] = {}
        self._totals: dict[str, list[int]] = {}  # expert -> [ok, failed, bytes]
        self._seen: set[tuple[str, int, int, bool]] = set()  # (expert, generation, outer step, ok)

    def load(self, history: History) -> None:
        """The rounds of the history file (up to 1000, oldest first), not written back."""
        for row in reversed(history.rounds(limit=1000)):
            self._seen.add((row.expert, row.generation, row.outer_step, row.ok))
            fields = {k: v for k, v in row.__dict__.items() if k != "expert"}
            self.add(row.expert, RoundSummary(**fields), persist=False)

    def unseen(self, entries: Iterable[Entry[Any]]) -> Iterator[tuple[str, RoundSummary]]:
        """(expert, round) of each round in ``groups`` records not seen before, marked seen as yielded.

        Reads the typed :class:`~cogen.protocols.records.GroupProgress` fields; a record of another kind
        is skipped explicitly, as is a group record with no round yet (a node without averaging has
        no ``groups`` record at all)."""
        for entry in entries:
            rec = entry.record
            if not isinstance(rec, GroupProgress) or rec.last_round is None:
                continue
            last = rec.last_round
            key = (rec.expert, rec.generation, last.outer_step, last.ok)
            if key in self._seen:
                continue
            self._seen.add(key)
            yield rec.expert, _summary(rec.generation, last)

    def add(self, expert: str, summary: RoundSummary, persist: bool) -> None:
        self._rounds.setdefault(expert, deque(maxlen=ROUNDS_KEPT)).append(summary)
        totals = self._totals.setdefault(expert, [0, 0, 0])
        totals[0 if summary.ok else 1] += 1
        totals[2] += summary.bytes_sent
        if persist and self.history is not None:
            # the history keeps the round itself; who was excluded is the live view's (and its alert's)
            self.history.add_round(RoundRow(expert=expert, **summary.model_dump(exclude={"excluded"})))

    def copy(self) -> tuple[dict[str, list[RoundSummary]], dict[str, list[int]]]:
        """The last rounds and the totals ([ok, failed, bytes sent]) of each expert, as copies."""
        return {e: list(r) for e, r in self._rounds.items()}, {e: list(t) for e, t in self._totals.items()}


def _summary(generation: int, last: RoundReport) -> RoundSummary:
    """What the monitor shows of a group's round (the report of its first reporting member)."""
    return RoundSummary(
        outer_step=last.outer_step,
        generation=generation,
        finished_at=last.time,
        group_size=last.group_size,
        duration_s=last.duration_s,
        bytes_sent=last.bytes_sent,
        ok=last.ok,
        error=last.reason or None,
        excluded=[str(p) for p in last.excluded],
    )
