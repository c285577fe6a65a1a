"""Health checks behind ``/healthz`` (alive) and ``/readyz`` (doing its job), for nodes and the coordinator.

A check is a name, a verdict and one line saying why. :func:`verdict` turns a list of them into the
HTTP status (200 when all pass, else 503) and the JSON body ``{"ok", "failed", "checks"}``, so a
probe (Docker's HEALTHCHECK, Kubernetes, a person with curl) sees which check failed.
:func:`dht_check` is the liveness both sides share: the hivemind DHT process is alive and answers a
cheap call (its libp2p daemon's addresses) within a short timeout.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import hivemind

__all__ = ["Check", "HealthChecks", "dht_check", "verdict"]

DHT_TIMEOUT_S = 2.0  #: how long the DHT may take to answer a health check


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class HealthChecks(Protocol):
    """What a health endpoint asks: ``live()`` for ``/healthz``, ``ready()`` for ``/readyz``."""

    def live(self) -> list[Check]: ...

    def ready(self) -> list[Check]: ...


def verdict(checks: Sequence[Check]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body): 200 when every check passes, 503 otherwise."""
    failed = [c.name for c in checks if not c.ok]
    body = {
        "ok": not failed,
        "failed": failed,
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    return (503 if failed else 200), body


async def _answer(_dht: hivemind.DHT, node: Any) -> int:
    """Runs in the DHT's process: asks its libp2p daemon for its addresses (a local round trip)."""
    return len(await node.p2p.get_visible_maddrs())


def dht_check(dht: hivemind.DHT | None, timeout_s: float = DHT_TIMEOUT_S) -> Check:
    """The DHT process is alive and answers within ``timeout_s``."""
    if dht is None:
        return Check("dht", False, "not started yet")
    if not dht.is_alive():
        return Check("dht", False, "the DHT process is not running")
    try:
        addresses = dht.run_coroutine(_answer, return_future=True).result(timeout=timeout_s)
    except (concurrent.futures.TimeoutError, TimeoutError):
        return Check("dht", False, f"the DHT did not answer within {timeout_s:g} s")
    except Exception as e:  # a broken pipe to a dying process, an error in its daemon
        return Check("dht", False, f"the DHT failed to answer: {type(e).__name__}: {e}"[:200])
    return Check("dht", True, f"answering, {addresses} visible addresses")
