"""Starting cogen commands as child processes and waiting on them with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from cogen.core.exit_codes import CommandError, ExitCode

T = TypeVar("T")


class ChildFailed(RuntimeError, CommandError):
    """A child process exited badly or did not get ready in time."""

    exit_code = ExitCode.ERROR
    what = "demo"


def spawn(
    module: str,
    args: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Run ``python -m module args...`` with stdout and stderr going to ``log_path``, in ``environ``
    (default: this process's environment) plus ``env``.

    ``prefix`` goes before the interpreter, e.g. ``ip netns exec NAME`` to run it on another test host
    (it must exec the command, so the child's pid and process group are the interpreter's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    child_env = {**(os.environ if environ is None else environ), "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    finally:
        log.close()


def wait_for(
    condition: Callable[[], T | None],
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
    alive: Sequence[subprocess.Popen[bytes]] = (),
) -> T:
    """Poll ``condition`` until it returns something truthy; fail if a child in ``alive`` dies first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        for proc in alive:
            if proc.poll() is not None:
                raise ChildFailed(f"{what}: process {proc.pid} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise ChildFailed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` while it does not exist yet (files are written atomically)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
    return proc.returncode


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child and everything it started (hivemind's DHT and averager processes): children
    are started in their own session, so their process group is theirs alone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
