"""The averaging benchmark's worker processes and where they run.

A :class:`Child` is one worker (``workers.py``) in its own session that answers JSON lines, always
killed with its whole process group (also at exit). A :class:`Route` says where the workers run (a
network namespace per peer, or loopback); :func:`worker_cmd` is the command line of worker ``i`` on it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

from cogen.core.netns import Switch

from ..harness import child_env, module_command
from .workers import REPLY, BenchError

MODULE = "bench.averaging"  # workers run as ``python -m bench.averaging --worker ...``


_LIVE: set[Child] = set()


class Child:
    """A worker process (in its own session) that answers JSON lines; always killed with its group."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name, self.log_path = name, log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env={**child_env(), "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
            )  # fmt: skip
        _LIVE.add(self)
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY) :]))
        self.replies.put(None)

    def send(self, **cmd: Any) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchError(f"{self.name} is gone (exit code {self.proc.poll()})\n{self.tail()}") from None

    def reply(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            data = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(
                f"{self.name}: no answer to {what} within {timeout:.0f} s\n{self.tail()}"
            ) from None
        if data is None:
            code = self.proc.wait(10)
            raise BenchError(f"{self.name} exited (code {code}) during {what}\n{self.tail()}")
        return data

    def poll_reply(self, what: str) -> dict[str, Any] | None:
        """The next answer if there is one already (raises if the child exited)."""
        try:
            data = self.replies.get_nowait()
        except queue.Empty:
            return None
        if data is None:
            code = self.proc.wait(10)
            raise BenchError(f"{self.name} exited (code {code}) during {what}\n{self.tail()}")
        return data

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self, grace_s: float = 30.0) -> None:
        """Ask it to exit, wait, then SIGKILL its whole process group (its DHT and averager processes)."""
        if self.proc.poll() is None:
            with contextlib.suppress(BenchError):
                self.send(cmd="exit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        _LIVE.discard(self)


@atexit.register
def _kill_children() -> None:
    for child in list(_LIVE):
        child.close(grace_s=1.0)


class Route:
    """Where the peers run: a namespace per peer behind rate-limited links, or loopback."""

    def __init__(self, name: str, switch: Switch | None):
        self.name, self.switch = name, switch

    def host(self, i: int) -> str:
        return self.switch.addresses[i] if self.switch else "127.0.0.1"

    def prefix(self, i: int) -> list[str]:
        return self.switch.exec_prefix(i) if self.switch else []


def worker_cmd(path: Route, i: int, *flags: str) -> list[str]:
    """The command line of worker ``i`` on ``path`` (inside its namespace, if any)."""
    return [*path.prefix(i), *module_command(MODULE, *flags)]
