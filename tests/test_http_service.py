"""The one lifecycle of an HTTP server in a thread (:class:`cogen.core.http_service.ServerThread`), with
both backends: the standard library's (node metrics, base mirror) and uvicorn's (the coordinator's API).
Real servers on 127.0.0.1, real requests."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cogen.coordinator.api_server import ApiServer
from cogen.core.http_service import HttpServer, ServerThread
from cogen.core.swarm import NetworkError
from cogen.node.follow import MirrorServer
from cogen.node.metrics import NodeMetrics


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _api() -> ApiServer:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello " + request.url.path)

    return ApiServer(Starlette(routes=[Route("/{rest:path}", hello)]), "127.0.0.1", 0)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    "make", [lambda: HttpServer(_Hello, "127.0.0.1", 0), _api], ids=["stdlib", "uvicorn"]
)
def test_start_serve_stop_promptly_and_start_again(make: Any) -> None:
    server: ServerThread = make()
    server.stop()  # stopping a server never started is harmless
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    server.start()
    try:
        port = server.port
        assert port != 0 and server.is_running()  # port 0 asked: the real one is reported
        assert _get(f"http://127.0.0.1:{port}/x") == "hello /x"
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        idle = socket.create_connection(("127.0.0.1", port))  # a client that never sends a request
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3.0, "stop() waited on an idle client"
        idle.close()
        assert not server.is_running() and _refused(port)  # the port is released
        server.stop()  # twice is harmless
        server.start()  # a stopped server may start again: it binds anew
        assert server.is_running() and _get(f"http://127.0.0.1:{server.port}/again") == "hello /again"
    finally:
        server.stop()
    assert not server.is_running()


def test_a_taken_port_fails_in_start_with_a_clear_error() -> None:
    with HttpServer(_Hello, "127.0.0.1", 0) as first:
        with pytest.raises(OSError):
            HttpServer(_Hello, "127.0.0.1", first.port).start()
        api = ApiServer(Starlette(), "127.0.0.1", first.port)
        with pytest.raises(NetworkError, match=f"could not listen on 127.0.0.1:{first.port}"):
            api.start()
        assert not api.is_running()


def test_the_mirror_starts_only_when_asked_and_serves_files_but_no_listings(tmp_path: Path) -> None:
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / ".gen-staging").mkdir()
    (tmp_path / ".gen-staging" / "partial").write_bytes(b"half")
    mirror = MirrorServer(tmp_path, "127.0.0.1")
    assert not mirror.is_running()  # constructing it binds and serves nothing
    with mirror:
        assert mirror.url == f"http://127.0.0.1:{mirror.port}/"
        assert _get(mirror.url + "gen/model.safetensors") == "weights"
        for hidden in ("gen/", ".gen-staging/partial"):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                _get(mirror.url + hidden)
        mirror.public_url = "http://192.0.2.1:9/"
        assert mirror.url == "http://192.0.2.1:9/"  # what peers are told
    assert not mirror.is_running()


def test_node_metrics_refuse_a_second_start_and_may_start_after_stop() -> None:
    with NodeMetrics(expert="code") as metrics:
        assert metrics.url is None and metrics.port is None
        url = metrics.start("127.0.0.1", 0)
        assert url == metrics.url and "cogen_node_steps" in _get(url)
        with pytest.raises(RuntimeError, match="already served"):
            metrics.start("127.0.0.1", 0)
        metrics.stop()
        assert not metrics.is_running() and metrics.url is None
        assert "cogen_node_steps" in _get(metrics.start("127.0.0.1", 0))
    assert not metrics.is_running()


def test_a_client_that_goes_away_mid_download_is_a_debug_line_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    import logging
    import struct

    from cogen.core.procs import wait_for

    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "model.safetensors").write_bytes(b"\0" * (32 << 20))  # more than socket buffers
    caplog.set_level(logging.DEBUG, logger="cogen.core.http_service")
    with MirrorServer(tmp_path, "127.0.0.1") as mirror:
        client = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
        client.sendall(
            f"GET /gen/model.safetensors HTTP/1.1\r\nHost: 127.0.0.1:{mirror.port}\r\n\r\n".encode()
        )
        assert client.recv(4096).startswith(b"HTTP/1.")
        client.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )  # reset, as a kill does
        client.close()
        wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), 20, "the server noticed")
        assert _get(mirror.url + "gen/model.safetensors")[:1] == "\0"  # and goes on serving
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
