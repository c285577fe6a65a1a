"""The dashboard's memory: loss points and averaging rounds in a small SQLite file.

:class:`History` is written by the monitor thread and read by the API's threads (one connection,
guarded by a lock, WAL journal). It is bounded: at most ``max_points`` loss points per peer, and
nothing about a peer or group not heard from for ``retention_s``; :meth:`History.prune` enforces both.
A coordinator restarted on the same file shows the curves it had before.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: rounds have a generation (version 1 files are upgraded in place)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS loss_points (
    peer TEXT NOT NULL, expert TEXT NOT NULL, t REAL NOT NULL, step INTEGER NOT NULL,
    loss REAL, samples_per_second REAL NOT NULL, PRIMARY KEY (peer, t)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS loss_points_expert_t ON loss_points (expert, t);
CREATE TABLE IF NOT EXISTS rounds (
    expert TEXT NOT NULL, outer_step INTEGER NOT NULL, finished_at REAL NOT NULL, group_size INTEGER NOT NULL,
    duration_s REAL NOT NULL, bytes_sent INTEGER NOT NULL, ok INTEGER NOT NULL, error TEXT,
    generation INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (expert, outer_step, finished_at)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class LossPoint:
    peer: str
    expert: str
    t: float
    step: int
    loss: float  # NaN is kept: a curve that turns NaN is what the alerts look for
    samples_per_second: float


@dataclass(frozen=True)
class RoundRow:
    expert: str
    outer_step: int
    finished_at: float
    group_size: int
    duration_s: float
    bytes_sent: int
    ok: bool
    error: str | None = None
    generation: int = 0


_ROUND_COLUMNS = "expert, outer_step, finished_at, group_size, duration_s, bytes_sent, ok, error, generation"


class History:
    """A bounded, thread-safe SQLite store of loss points and averaging rounds."""

    def __init__(self, path: Path | str, max_points: int = 2000, retention_s: float = 7 * 86400.0):
        self.path = str(path)
        self.max_points = max_points
        self.retention_s = retention_s
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) == 1:  # rounds had no generation: they were all generation 0's, as far as known
                self._db.execute("ALTER TABLE rounds ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"history file {self.path} has schema {row[0]}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_points(self, points: list[LossPoint]) -> None:
        """Store loss points (a point already stored for the same peer and time is ignored)."""
        if not points:
            return
        rows = [
            (p.peer, p.expert, p.t, p.step, p.loss if not math.isnan(p.loss) else None, p.samples_per_second)
            for p in points
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO loss_points VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def add_round(self, row: RoundRow) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO rounds ({_ROUND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.expert,
                    row.outer_step,
                    row.finished_at,
                    row.group_size,
                    row.duration_s,
                    row.bytes_sent,
                    int(row.ok),
                    row.error,
                    row.generation,
                ),
            )

    def loss_points(self, expert: str | None = None, since: float = 0.0) -> list[LossPoint]:
        """Loss points in time order, of one expert or all."""
        query = "SELECT peer, expert, t, step, loss, samples_per_second FROM loss_points WHERE t >= ?"
        args: tuple[object, ...] = (since,)
        if expert is not None:
            query, args = query + " AND expert = ?", (since, expert)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY t", args).fetchall()
        return [
            LossPoint(p, e, t, s, math.nan if loss is None else loss, sps) for p, e, t, s, loss, sps in rows
        ]

    def rounds(self, expert: str | None = None, limit: int = 100) -> list[RoundRow]:
        """The latest averaging rounds, newest first."""
        query = f"SELECT {_ROUND_COLUMNS} FROM rounds"
        args: tuple[object, ...] = ()
        if expert is not None:
            query, args = query + " WHERE expert = ?", (expert,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY finished_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [RoundRow(e, s, f, g, d, b, bool(ok), err, gen) for e, s, f, g, d, b, ok, err, gen in rows]

    def prune(self, now: float | None = None) -> int:
        """Drop points beyond ``max_points`` per peer and anything older than ``retention_s``."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        with self._lock:
            self._db.execute("BEGIN")
            removed = self._db.execute("DELETE FROM loss_points WHERE t < ?", (cutoff,)).rowcount
            removed += self._db.execute(
                "DELETE FROM loss_points WHERE (peer, t) IN (SELECT peer, t FROM (SELECT peer, t, "
                "ROW_NUMBER() OVER (PARTITION BY peer ORDER BY t DESC) AS n FROM loss_points) WHERE n > ?)",
                (self.max_points,),
            ).rowcount
            removed += self._db.execute("DELETE FROM rounds WHERE finished_at < ?", (cutoff,)).rowcount
            removed += self._db.execute(
                "DELETE FROM rounds WHERE (expert, outer_step, finished_at) IN (SELECT expert, outer_step, "
                "finished_at FROM (SELECT expert, outer_step, finished_at, ROW_NUMBER() OVER (PARTITION BY "
                "expert ORDER BY finished_at DESC) AS n FROM rounds) WHERE n > ?)",
                (self.max_points,),
            ).rowcount
            self._db.execute("COMMIT")
        if removed:
            logger.debug("history: pruned %d rows", removed)
        return removed
