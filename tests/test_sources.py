"""Which checkpoint source a follower tries next: endorsement, majority, backoff and distrust.

:class:`cogen.node.sources.SourceBook` on a fake clock (its own constructor argument): no network.
"""

from __future__ import annotations

from cogen.core.config import FetchConfig
from cogen.node.sources import SourceBook
from cogen.protocols import CheckpointSource

PEER = "12D3KooWSb9uUfn3yQrD2xTJmUFr4PbYBb7oYbP2pCSs3rGqCwTq"


def test_sources_are_ordered_by_what_the_coordinator_and_the_majority_announce() -> None:
    now = [0.0]
    book = SourceBook(
        FetchConfig(fetch_backoff_s=2, fetch_backoff_max_s=10, distrust_s=100), clock=lambda: now[0]
    )
    good, forged = "a" * 64, "b" * 64

    def source(url: str, generation: int, sha: str, time: float = 1.0) -> CheckpointSource:
        return CheckpointSource(peer_id=PEER, generation=generation, manifest_sha256=sha, url=url, time=time)

    coordinator = source("http://c/", 3, good)
    mirror = source("http://m/", 3, good)
    loud = source("http://x/", 3, forged, time=1e9)  # claims to be the freshest
    newer = source("http://y/", 9, forged)  # claims a generation the coordinator does not announce
    announced = [(b"c", coordinator), (b"m", mirror), (b"x", loud), (b"y", newer)]
    order = book.order(announced, endorsed={(3, good)})
    assert {s.url for s in order[:2]} == {"http://c/", "http://m/"} and order[2:] == [newer, loud]
    without = book.order(announced, endorsed=set())  # no coordinator: newest first, then the majority
    assert without[0] == newer and {s.url for s in without[1:3]} == {"http://c/", "http://m/"}
    # backoff: jittered within [50 %, 100 %] of a doubling delay, capped
    delays = [book.transfer_failed(coordinator) for _ in range(5)]
    assert [2 * 2**i * 0.5 <= d <= 2 * 2**i for i, d in enumerate(delays[:3])] == [True] * 3
    assert all(5 <= d <= 10 for d in delays[3:])
    assert not book.usable(coordinator) and book.order(announced, {(3, good)})[0] == mirror
    now[0] += 10.0
    assert book.usable(coordinator) and book.failures(coordinator) == 5
    assert book.order(announced, {(3, good)})[0] == mirror  # fewer past failures first
    # distrust: long but expiring, and only for that (url, sha)
    book.distrust(loud)
    assert book.is_distrusted(loud) and loud not in book.order(announced, set())
    assert book.usable(source("http://x/", 3, good))
    now[0] += 101.0
    assert not book.is_distrusted(loud) and book.usable(loud)
    book.succeeded(coordinator)
    assert book.failures(coordinator) == 0
    # this host's own failure (disk full) holds every source back
    book.local_failed()
    assert book.order(announced, {(3, good)}) == []
