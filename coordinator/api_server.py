"""The coordinator's HTTP API server: uvicorn in a background thread with a service's lifecycle."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn

from cogen.core.addresses import http_url, is_unspecified
from cogen.core.http_service import ServerThread
from cogen.core.swarm import NetworkError


class ApiServer(ServerThread):
    """uvicorn in a background thread, with the lifecycle of :class:`cogen.core.http_service.ServerThread`
    (``start`` / ``stop`` / ``is_running``; the socket is bound in ``start``, a stopped server may start
    again). A port it cannot listen on is a :class:`NetworkError`."""

    def __init__(self, app: Any, host: str, port: int):
        super().__init__("api-server")
        self.app, self.host, self.requested_port = app, host, port
        self.server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None

    def _bind(self) -> None:
        config = uvicorn.Config(self.app, host=self.host, port=self.requested_port, log_level="warning",
                                access_log=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        try:
            self._socket = config.bind_socket()
        except SystemExit:  # uvicorn logged why (the port is taken, the address is not this machine's)
            raise NetworkError(
                f"the HTTP API could not listen on {self.host}:{self.requested_port}"
            ) from None

    def _serve(self) -> None:
        assert self.server is not None and self._socket is not None
        self.server.run(sockets=[self._socket])

    def _ready(self) -> bool:
        return self.server is not None and self.server.started

    def _shutdown(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()

    def _bound(self) -> tuple[str, int]:
        if self._socket is None:
            return self.host, self.requested_port
        return self.host, int(self._socket.getsockname()[1])

    def start(self, timeout_s: float = 30.0) -> None:
        try:
            super().start(timeout_s)
        except OSError as e:
            raise NetworkError(
                f"the HTTP API could not listen on {self.host}:{self.requested_port}: {e}"
            ) from None

    @property
    def url(self) -> str:
        """Where this process reaches the API (a wildcard bind is reached on loopback)."""
        return http_url("127.0.0.1" if is_unspecified(self.host) else self.host, self.port)
