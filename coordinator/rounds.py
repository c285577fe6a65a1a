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

from cogen.coordinator.history import History, RoundRow
from cogen.coordinator.schemas import RoundSummary
from cogen.core.swarm import Entry

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

    def unseen(self, entries: Iterable[Entry]) -> Iterator[tuple[str, RoundSummary]]:
        """(expert, round) of each round in ``groups`` records not seen before, marked seen as yielded.

        Read defensively (by attribute) so the view works with and without group averaging."""
        for entry in entries:
            rec, last = entry.record, getattr(entry.record, "last_round", None)
            expert = getattr(rec, "expert", None)
            if last is None or not isinstance(expert, str):
                continue
            generation = getattr(rec, "generation", 0)
            key = (
                expert,
                generation if isinstance(generation, int) else 0,
                int(last.outer_step),
                bool(last.ok),
            )
            if key in self._seen:
                continue
            self._seen.add(key)
            yield (
                expert,
                RoundSummary(
                    outer_step=key[2],
                    generation=key[1],
                    finished_at=float(last.time),
                    group_size=int(last.group_size),
                    duration_s=float(last.duration_s),
                    bytes_sent=int(last.bytes_sent),
                    ok=key[3],
                    error=str(getattr(last, "reason", "")) or None,
                    excluded=[str(p) for p in getattr(last, "excluded", [])][:32],
                ),
            )

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
