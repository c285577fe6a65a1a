"""What every cogen command shares: signal handling and mapping failures to exit codes."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from cogen.checkpoint import CheckpointError
from cogen.exit_codes import ExitCode
from cogen.models import ModelError
from cogen.protocols import IncompatibleProtocolError
from cogen.settings import ConfigError
from cogen.swarm import NetworkError

logger = logging.getLogger("cogen")

#: exception type -> (exit code, what failed)
FAILURES: list[tuple[type[BaseException], ExitCode, str]] = [
    (ConfigError, ExitCode.CONFIG, "bad configuration"),
    (IncompatibleProtocolError, ExitCode.PROTOCOL, "incompatible swarm"),
    (NetworkError, ExitCode.NETWORK, "network"),
    (ModelError, ExitCode.MODEL, "model"),
    (CheckpointError, ExitCode.DATA, "checkpoint"),
]


def register_failure(exc_type: type[BaseException], code: ExitCode, what: str) -> None:
    FAILURES.append((exc_type, code, what))


def stop_on_signals(stop_event: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop_event``; a second SIGINT exits at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop_event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.info("received %s: stopping cleanly", signal.Signals(signum).name)
        stop_event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def exit_after_grace(stop_event: threading.Event, grace_s: float, command: str) -> None:
    """Once ``stop_event`` is set, give the process ``grace_s`` seconds to stop cleanly; then say so in one
    line and exit at once (a last resort: what it saves is written atomically, so nothing is torn)."""

    def watch() -> None:
        stop_event.wait()
        if not threading.Event().wait(grace_s):
            logger.error("%s: did not stop within its %.0f s grace period; exiting now", command, grace_s)
            os._exit(ExitCode.ERROR)

    threading.Thread(target=watch, name="grace-period", daemon=True).start()


def run_main(command: str, body: Callable[[], int]) -> int:
    """Run ``body`` and map known failures to numbered exit codes with a one-line message."""
    try:
        return body()
    except KeyboardInterrupt:
        logger.error("%s: interrupted", command)
        return ExitCode.INTERRUPTED
    except Exception as e:
        for exc_type, code, what in FAILURES:
            if isinstance(e, exc_type):
                logger.error("%s: %s error: %s", command, what, e)
                return code
        logger.exception("%s: unexpected failure", command)
        return ExitCode.ERROR
