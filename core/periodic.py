"""A background thread that does one unit of work every interval: ``start`` / ``stop`` / ``is_running``.

The stop Event doubles as the sleep, so ``stop()`` returns promptly; a failing tick is logged and
retried at the next interval, never kills the thread. Work retried after a failure waits by
:class:`cogen.core.backoff.Backoff`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)


class PeriodicService(ABC):
    """Subclasses implement :meth:`tick`; ``name`` and ``interval_s`` are set by ``__init__``."""

    def __init__(self, name: str, interval_s: float, run_first: bool = True):
        self.name = name
        self.interval_s = interval_s
        self.run_first = run_first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def tick(self) -> None:
        """One unit of work."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        if not self.run_first and self._stop.wait(self.interval_s):
            return
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a DHT or network hiccup must not kill the service
                logger.warning("%s failed; retrying in %.1f s", self.name, self.interval_s, exc_info=True)
            self._stop.wait(self.interval_s)
