"""The monitor's book of averaging rounds: typed group records in, each round once, others skipped."""

from __future__ import annotations

from pathlib import Path

from cogen.coordinator.history import History
from cogen.coordinator.rounds import RoundBook
from cogen.core.swarm import Entry
from cogen.protocols.records import GroupProgress, Record, RoundReport, TrainingProgress

PEER = "12D3KooWSb9uUfn3yQrD2xTJmUFr4PbYBb7oYbP2pCSs3rGqCwTq"


def _group(generation: int, outer_step: int, ok: bool = True, last: bool = True) -> GroupProgress:
    report = RoundReport(
        outer_step=outer_step, ok=ok, reason="" if ok else "timed out", group_size=2, duration_s=1.5,
        bytes_sent=1000, weight=8.0, time=100.0 + outer_step,
    )  # fmt: skip
    return GroupProgress(
        peer_id=PEER, expert="code", outer_step=outer_step, generation=generation, inner_steps=3,
        compression="8bit", rounds_ok=outer_step, rounds_failed=0, last_round=report if last else None,
    )  # fmt: skip


def _entry(record: Record) -> Entry[Record]:
    return Entry(owner=b"owner", record=record, expiration_time=1e12)


def test_each_round_is_let_through_once_per_generation_and_result(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite3")
    book = RoundBook(history)
    members = [_entry(_group(0, 1)), _entry(_group(0, 1))]  # both members of the group report round 1
    (expert, summary), *more = list(book.unseen(members))
    assert not more and expert == "code"
    assert (summary.generation, summary.outer_step, summary.ok, summary.error) == (0, 1, True, None)
    assert (summary.finished_at, summary.group_size, summary.duration_s, summary.bytes_sent) == (
        101.0, 2, 1.5, 1000
    )  # fmt: skip
    assert list(book.unseen(members)) == []  # seen
    failed, next_gen = _entry(_group(0, 1, ok=False)), _entry(_group(1, 1))
    got = [(s.generation, s.outer_step, s.ok, s.error) for _, s in book.unseen([failed, next_gen])]
    assert got == [(0, 1, False, "timed out"), (1, 1, True, None)]
    book.add(expert, summary, persist=True)
    rows = history.rounds(expert="code")
    assert [(r.generation, r.outer_step) for r in rows] == [(0, 1)]
    again = RoundBook()
    again.load(history)  # a restarted monitor does not count a round of the file twice
    assert list(again.unseen(members)) == []
    assert again.copy()[1] == {"code": [1, 0, 1000]}
    history.close()


def test_a_record_of_another_kind_or_without_a_round_is_skipped() -> None:
    book = RoundBook()
    progress = TrainingProgress(
        peer_id=PEER, expert="code", step=10, samples=40, tokens=5120, loss=2.5, samples_per_second=3.0,
        peak_memory_bytes=10**9, time=100.0,
    )  # fmt: skip
    entries = [_entry(progress), _entry(_group(0, 0, last=False)), _entry(_group(0, 2))]
    assert [(e, s.outer_step) for e, s in book.unseen(entries)] == [("code", 2)]
    assert book.copy() == ({}, {})  # unseen() only reads; add() keeps
