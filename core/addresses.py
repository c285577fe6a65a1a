"""Addresses a peer announces: every URL and multiaddr it puts on the DHT must be reachable by others.

A service binds one address (``--host``, ``--api-host``, ``--serve-host``, ``--metrics-host``) and
announces another: ``--public-url`` where HTTP sits behind a proxy, else ``--announce-host``, else
the bound address itself — except an unspecified one (``0.0.0.0``, ``::``), which is never
announced: it stands for the peer's public address, taken from the addresses its DHT is visible at.
A loopback address announced into a swarm whose peers are elsewhere is reachable by nobody; that is
warned about once per service (it is right on one machine, as in the demo and most tests).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_unspecified(host: str) -> bool:
    """``0.0.0.0`` / ``::``: listen everywhere, never a destination."""
    address = _address(host)
    return address is not None and address.is_unspecified


def is_loopback(host: str) -> bool:
    address = _address(host)
    return (address is not None and address.is_loopback) or host == "localhost"


def maddr_host(maddr: str) -> str | None:
    """The IP address of an ``/ip4/...`` or ``/ip6/...`` multiaddr (None for DNS names or garbage)."""
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


def public_host(visible_maddrs: Iterable[str], fallback: str = "127.0.0.1") -> str:
    """A peer's public address: the first non-loopback IP among the multiaddrs its DHT is visible at."""
    for maddr in visible_maddrs:
        host = maddr_host(maddr)
        if host is not None and not is_loopback(host) and not is_unspecified(host):
            return host
    return fallback


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` now (for services that must know their port before binding)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]"), 0))
        return int(sock.getsockname()[1])


def announced_host(bind_host: str, announce_host: str | None, public: str) -> str:
    """The host to announce for a service bound to ``bind_host``.

    A loopback bind stays loopback (announcing another address would point at nothing that listens);
    ``announce_host`` wins otherwise; an unspecified bind becomes ``public``.
    """
    if is_loopback(bind_host):
        return bind_host
    if announce_host:
        return announce_host
    return public if is_unspecified(bind_host) else bind_host


def http_url(host: str, port: int, path: str = "") -> str:
    """``http://host:port/path`` with IPv6 hosts in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def peers_elsewhere(initial_peers: Sequence[str]) -> bool:
    """Whether some initial peer is on another machine (a non-loopback address or a DNS name)."""
    for maddr in initial_peers:
        host = maddr_host(maddr)
        if host is None or not is_loopback(host):
            return True
    return False


def warn_if_unreachable(service: str, url_host: str, initial_peers: Sequence[str]) -> None:
    """Warn once if ``service`` announces a loopback address to peers on other machines."""
    if is_loopback(url_host) and peers_elsewhere(initial_peers) and service not in _warned:
        _warned.add(service)
        logger.warning(
            "%s is announced at loopback address %s, but the swarm's peers are on other machines: they "
            "cannot reach it (bind it to a public address, or set --announce-host / --public-url)",
            service,
            url_host,
        )
