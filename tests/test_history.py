"""The dashboard's SQLite history: bounded, NaN-safe, and still there after a reopen."""

from __future__ import annotations

import math
import threading
from pathlib import Path

from cogen.coordinator.history import History, LossPoint, RoundRow


def _points(peer: str, n: int, t0: float = 1000.0, expert: str = "medical") -> list[LossPoint]:
    return [LossPoint(peer, expert, t0 + i, i, 3.0 - i * 0.01, 5.0) for i in range(n)]


def test_points_and_rounds_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h" / "history.sqlite3"
    h = History(path)
    h.add_points([*_points("a", 3), LossPoint("b", "code", 1001.5, 1, math.nan, 2.0)])
    h.add_points(_points("a", 3))  # the same points again are ignored
    h.add_round(RoundRow("medical", 1, 1002.0, 2, 1.5, 1024, True))
    h.add_round(RoundRow("medical", 2, 1003.0, 2, 9.0, 0, False, "timeout"))
    h.close()
    h = History(path)
    points = h.loss_points()
    assert [(p.peer, p.step) for p in points] == [("a", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert math.isnan(points[2].loss) and points[0].loss == 3.0
    assert [p.peer for p in h.loss_points(expert="code")] == ["b"]
    assert [(r.outer_step, r.ok, r.error) for r in h.rounds()] == [(2, False, "timeout"), (1, True, None)]
    h.close()


def test_prune_keeps_the_newest_points_per_peer_and_drops_old_peers(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite3", max_points=10, retention_s=3600)
    h.add_points(_points("a", 25, t0=10_000.0) + _points("b", 5, t0=10_000.0) + _points("old", 5, t0=1.0))
    removed = h.prune(now=10_100.0)
    assert removed == 15 + 5
    a = [p for p in h.loss_points() if p.peer == "a"]
    assert [p.step for p in a] == list(range(15, 25))
    assert len(h.loss_points()) == 15
    h.close()


def test_concurrent_writer_and_readers(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite3", max_points=50)
    errors: list[BaseException] = []

    def write() -> None:
        for i in range(50):
            h.add_points(_points(f"p{i % 5}", 10, t0=i * 10.0))
            h.prune(now=1000.0)

    def read() -> None:
        try:
            for _ in range(50):
                assert all(p.expert == "medical" for p in h.loss_points())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write), *(threading.Thread(target=read) for _ in range(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(h.loss_points()) == 5 * 50
    h.close()


def test_a_schema_1_file_is_upgraded_and_keeps_its_rounds(tmp_path: Path) -> None:
    """Files written before rounds had a generation open as generation 0's rounds."""
    import sqlite3

    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE rounds (expert TEXT NOT NULL, outer_step INTEGER NOT NULL, finished_at REAL NOT NULL,"
        " group_size INTEGER NOT NULL, duration_s REAL NOT NULL, bytes_sent INTEGER NOT NULL,"
        " ok INTEGER NOT NULL, error TEXT, PRIMARY KEY (expert, outer_step, finished_at)) WITHOUT ROWID;"
        "INSERT INTO rounds VALUES ('medical', 3, 1000.0, 2, 1.0, 10, 1, NULL);"
    )
    db.commit()
    db.close()
    h = History(path)
    h.add_round(RoundRow("medical", 1, 1001.0, 2, 1.0, 10, True, generation=1))
    assert [(r.generation, r.outer_step) for r in h.rounds()] == [(1, 1), (0, 3)]
    h.close()
    h = History(path)  # upgraded once, opened as version 2 from now on
    assert len(h.rounds()) == 2
    h.close()
