"""What a peer announces is reachable: no wildcard address, the announce host wins, loopback warned."""

from __future__ import annotations

import logging

import pytest

from cogen.coordinator.config import ApiConfig
from cogen.core import addresses
from cogen.core.addresses import announced_host, http_url, maddr_host, peers_elsewhere, public_host
from cogen.core.config import NetworkConfig
from cogen.core.swarm import SwarmClient

REMOTE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def test_a_wildcard_bind_is_announced_as_the_public_address() -> None:
    visible = ["/ip4/127.0.0.1/tcp/4001/p2p/X", "/ip4/10.213.0.3/tcp/4001/p2p/X"]
    assert public_host(visible) == "10.213.0.3"
    assert announced_host("0.0.0.0", None, public_host(visible)) == "10.213.0.3"
    assert announced_host("0.0.0.0", "198.51.100.7", "10.213.0.3") == "198.51.100.7"
    assert announced_host("10.213.0.3", None, "10.213.0.9") == "10.213.0.3"
    # a service bound to loopback stays loopback: announcing another address points at nothing
    assert announced_host("127.0.0.1", "198.51.100.7", "10.213.0.3") == "127.0.0.1"
    assert http_url("::1", 80, "/x") == "http://[::1]:80/x"
    assert maddr_host("/dns4/example.org/tcp/1") is None and maddr_host("/ip6/::1/tcp/1") == "::1"
    assert peers_elsewhere([REMOTE]) and peers_elsewhere(["/dns4/example.org/tcp/1/p2p/X"])
    assert not peers_elsewhere(["/ip4/127.0.0.1/tcp/1/p2p/X"]) and not peers_elsewhere([])


def test_a_loopback_url_into_a_remote_swarm_is_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    addresses._warned.discard("the test service")
    with caplog.at_level(logging.WARNING, logger="cogen.core.addresses"):
        addresses.warn_if_unreachable("the test service", "127.0.0.1", [REMOTE])
        addresses.warn_if_unreachable("the test service", "127.0.0.1", [REMOTE])
        addresses.warn_if_unreachable("the test service", "10.213.0.3", [REMOTE])
    assert len([r for r in caplog.records if "the test service" in r.getMessage()]) == 1


def test_announce_host_applies_to_the_dht_and_http_urls() -> None:
    client = SwarmClient(NetworkConfig(swarm="addr", host="127.0.0.1", announce_host="127.0.0.2"))
    try:
        visible = client.visible_maddrs()
        assert visible and all(maddr_host(m) == "127.0.0.2" for m in visible), visible
        port = int(visible[0].split("/")[4])
        assert port > 0  # hivemind cannot announce port 0: a port was chosen first
        assert client.announce_url("api", "0.0.0.0", 8765) == "http://127.0.0.2:8765"
        assert client.announce_url("api", "0.0.0.0", 8765, public_url="https://lab.example/cogen/") == (
            "https://lab.example/cogen"
        )
        assert client.optional_url("metrics", "0.0.0.0", 9100, "/metrics") == "http://127.0.0.2:9100/metrics"
    finally:
        client.shutdown()


def test_public_url_must_be_a_plain_http_url() -> None:
    assert ApiConfig(public_url="https://lab.example:8443/cogen").public_url
    for bad in ("ftp://x", "http://x/?q=1", "lab.example"):
        with pytest.raises(ValueError, match="public_url"):
            ApiConfig(public_url=bad)
