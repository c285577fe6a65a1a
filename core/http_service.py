"""An HTTP server in a background thread, with one lifecycle: ``start()`` / ``stop()`` / ``is_running()``.

:class:`ServerThread` is that lifecycle for every HTTP server cogen runs:

- ``start()`` binds (in the caller's thread, so a taken port fails right there with ``OSError``; port 0
  picks a free one and :attr:`ServerThread.port` is the real one), serves from a daemon thread, and
  returns once requests are answered. Starting a running server raises ``RuntimeError``; a stopped one
  may be started again (it binds anew).
- ``stop()`` returns promptly (within a poll interval plus the requests in flight), releases the port and
  may be called any number of times, also before ``start``.

Two backends: :class:`HttpServer` (the standard library's ``ThreadingHTTPServer`` with a handler class:
the node's ``/metrics`` and base mirror) and the coordinator's uvicorn API
(:class:`cogen.coordinator.api_server.ApiServer`), which implements the same four steps.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from socketserver import BaseRequestHandler
from typing import Any

from cogen.core.addresses import http_url

logger = logging.getLogger(__name__)

POLL_S = 0.1  #: how often a stdlib server looks for a stop request


class ServerThread(ABC):
    """Subclasses bind, serve, ask the serving loop to end and close; this class runs them in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None

    @abstractmethod
    def _bind(self) -> None:
        """Open the listening socket (raises ``OSError`` when it cannot)."""

    @abstractmethod
    def _serve(self) -> None:
        """Serve until :meth:`_shutdown` is called (runs in the server's thread)."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Make :meth:`_serve` return."""

    @abstractmethod
    def _close(self) -> None:
        """Release the socket (after the serving thread ended)."""

    @abstractmethod
    def _bound(self) -> tuple[str, int]:
        """The host and port the socket is bound to."""

    def _ready(self) -> bool:
        """Whether requests are answered yet (a stdlib server is, once bound)."""
        return True

    def start(self, timeout_s: float = 30.0) -> None:
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running at {self.url_base}")
        self._bind()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"{self.name} did not start serving on {self.url_base}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._shutdown()
        thread.join(timeout=timeout_s)
        self._close()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for); only while started."""
        if self._thread is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._bound()

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url_base(self) -> str:
        """``http://host:port`` of the bound address (a wildcard host stays as bound)."""
        host, port = self._bound()
        return http_url(host, port)


class _StdlibServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up stop()

    def __init__(self, host: str, port: int, handler: Callable[..., BaseRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-response (a cancelled download, a peer that died) is one debug
        line, not a traceback on stderr; anything else is logged with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            logger.debug("HTTP client %s went away: %s", client_address, error)
            return
        logger.exception("HTTP request from %s failed", client_address)


class HttpServer(ServerThread):
    """The standard library's threading HTTP server for ``handler`` (a ``BaseHTTPRequestHandler``
    class, or a ``functools.partial`` of one) on ``host``:``port``."""

    def __init__(
        self,
        handler: Callable[..., BaseRequestHandler],
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "http",
    ) -> None:
        super().__init__(name)
        self.handler, self.host, self.requested_port = handler, host, port
        self._server: _StdlibServer | None = None

    def _bind(self) -> None:
        self._server = _StdlibServer(self.host, self.requested_port, self.handler)

    def _serve(self) -> None:
        assert self._server is not None
        self._server.serve_forever(poll_interval=POLL_S)

    def _shutdown(self) -> None:
        assert self._server is not None
        self._server.shutdown()

    def _close(self) -> None:
        assert self._server is not None
        self._server.server_close()

    def _bound(self) -> tuple[str, int]:
        if self._server is None:
            return self.host, self.requested_port
        host, port = self._server.server_address[:2]
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
