"""The test network itself: hosts reach each other, and only each other; faults do what they say."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import host_network

from cogen.core.netns import NetnsUnavailable, Switch, list_namespaces
from cogen.core.procs import wait_for

SERVE = (
    "import http.server as h; "
    "h.ThreadingHTTPServer(('0.0.0.0', 8000), h.SimpleHTTPRequestHandler).serve_forever()"
)


@pytest.fixture
def net() -> Iterator[Switch]:
    with host_network(3) as switch:
        yield switch


def _serve(net: Switch, host: int, tmp: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*net.exec_prefix(host), sys.executable, "-c", SERVE], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _reachable(net: Switch, src: int, url: str) -> bool:
    return net.reachable(src, url)


def test_hosts_reach_each_other_and_faults_cut_them_off(net: Switch, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    server = _serve(net, 0, str(tmp_path))
    try:
        url = f"http://{net.addresses[0]}:8000/x.txt"
        wait_for(lambda: _reachable(net, 1, url), 20, "host 1 reaches host 0's server")
        assert net.urlopen(2, url) == b"hello"
        assert _reachable(net, 0, "http://127.0.0.1:8000/x.txt")  # each host has its own loopback
        assert not _reachable(net, 1, "http://127.0.0.1:8000/x.txt")

        net.partition(0)
        assert not _reachable(net, 1, url)
        net.heal(0)
        wait_for(lambda: _reachable(net, 1, url), 20, "host 0 back after the partition")

        net.block_tcp(2, net.addresses[0], 8000)  # host 2 alone cannot reach that one service
        assert not _reachable(net, 2, url) and _reachable(net, 1, url)

        net.block_inbound(0)  # behind NAT: nobody reaches host 0, host 0 still dials out
        assert not _reachable(net, 1, url)
        assert _reachable(net, 0, "http://127.0.0.1:8000/x.txt")
        other = _serve(net, 1, str(tmp_path))
        try:
            wait_for(
                lambda: _reachable(net, 0, f"http://{net.addresses[1]}:8000/x.txt"), 20, "host 0 dials out"
            )
        finally:
            other.kill()
            other.wait()
    finally:
        server.kill()
        server.wait()


def test_a_failed_test_leaves_no_namespace_behind() -> None:
    switch = Switch(2)
    try:
        with switch:
            assert set(switch.names) <= set(list_namespaces())
            raise RuntimeError("a failing test")
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    except RuntimeError:
        pass
    assert not set(switch.names) & set(list_namespaces())
