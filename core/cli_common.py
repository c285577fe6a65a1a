"""What every cogen command shares: signal handling and mapping failures to exit codes."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from cogen.core.exit_codes import ExitCode

logger = logging.getLogger("cogen")


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
        code = getattr(e, "exit_code", None)  # the error classes carry theirs (cogen.core.exit_codes)
        if isinstance(code, int) and code != ExitCode.OK:
            logger.error("%s: %s error: %s", command, getattr(e, "what", "unexpected"), e)
            return code
        logger.exception("%s: unexpected failure", command)
        return ExitCode.ERROR
