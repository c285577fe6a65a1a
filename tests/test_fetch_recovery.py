"""Base downloads that recover: real HTTP donors that die, trickle or lie, real DHT records, real kills.

A donor is a real ``ThreadingHTTPServer`` over a copy of a published tiny-model generation that misbehaves
on its weight file; nothing in the download path is mocked. (A little over 300 lines: each way a
download can fail is a test here; the donors themselves live in ``donors.py``.)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from donors import WEIGHTS, Donor, announce_swarm, swarm_of
from merging_helpers import make_expert, merge_config

from cogen.coordinator.merging import Identity, merge_experts
from cogen.coordinator.merging.manifest import sign_manifest
from cogen.core.atomic import remove_stale_staging, staging_dir
from cogen.core.config import FetchConfig
from cogen.core.procs import wait_for
from cogen.core.swarm import SwarmClient
from cogen.node.fetch import FetchError
from cogen.node.follow import BaseFollower, fetch_base
from cogen.protocols import CheckpointSource, SwarmInfo
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE, Manifest, ManifestError, verify_manifest

PEER = "12D3KooWSb9uUfn3yQrD2xTJmUFr4PbYBb7oYbP2pCSs3rGqCwTq"
Served = tuple[Path, str, Identity]
FAST = FetchConfig(fetch_timeout_s=20, fetch_backoff_s=0.5, fetch_backoff_max_s=1.0)


@pytest.fixture(scope="module")
def served(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A published generation, the public key that signed it, and that key (the coordinator's)."""
    root = tmp_path_factory.mktemp("published")
    experts = (make_expert(tiny_path, root / "a", 1), make_expert(tiny_path, root / "b", 2, expert="code"))
    final = merge_experts(
        merge_config(experts=experts, method="ties", out=root / "out", identity=root / "id.pem")
    )
    identity = Identity.load_or_create(root / "id.pem")
    return final, identity.public_key, identity


@pytest.fixture
def donors(served: Served, tmp_path: Path) -> Iterator[Callable[..., Donor]]:
    started: list[Donor] = []

    def start(how: str = "serve", fail_first: int = 0, root: Path | None = None) -> Donor:
        if root is None:
            root = Path(shutil.copytree(served[0], tmp_path / f"donor-{len(started)}"))
        started.append(Donor(root, how, fail_first))
        return started[-1]

    yield start
    for donor in started:
        donor.release.set()
        if donor.server.socket.fileno() != -1:
            donor.stop()


def _empty_but(bases: Path, *keep: Path) -> bool:
    """Nothing in the cache but the fully verified directories ``keep``: no staging dir, no partial file."""
    return sorted(bases.iterdir()) == sorted(keep) if bases.is_dir() else not keep


@pytest.fixture
def swarm(request: pytest.FixtureRequest) -> Iterator[tuple[SwarmClient, Callable[[], SwarmClient]]]:
    """A real DHT: the follower's own client, and a way to start more peers that join it."""
    with swarm_of(request.node.name) as swarm:
        yield swarm


def _announce(client: SwarmClient, source: CheckpointSource, coordinator: Identity | None = None) -> None:
    if coordinator is not None:  # this peer is the swarm's coordinator
        announce_swarm(client, coordinator)
    client.publish(source.model_copy(update={"peer_id": client.peer_id})).result()


def _visible(host: SwarmClient, sources: int) -> None:
    """Wait until ``host`` reads the coordinator's SwarmInfo and all ``sources`` announcements."""
    wait_for(
        lambda: host.fetch(SwarmInfo) and len(host.fetch(CheckpointSource)) == sources,
        30,
        "the records are visible",
    )


def test_a_donor_that_dies_half_way_is_left_for_another_source(
    served: Served, donors: Callable[..., Donor], swarm: Any, tmp_path: Path
) -> None:
    host, join = swarm
    dying, mirror = donors("die"), donors("serve")
    coordinator, node = join(), join()
    _announce(coordinator, dying.source(), coordinator=served[2])  # it dies mid-transfer
    _visible(host, 1)
    bases = tmp_path / "bases"
    follower = BaseFollower(host, bases, generation=0, trusted_key=None, interval_s=0.2, fetch=FAST)
    follower.start()
    try:
        wait_for(dying.done.is_set, 60, "the follower started on the coordinator's copy")
        _announce(node, mirror.source())  # a node that has the base serves it
        wait_for(follower.has_ready, 60, "the follower fetched generation 1 from the mirror")
    finally:
        follower.stop()
    base = follower.take()
    assert base is not None and base.generation == 1
    assert dying.asked(WEIGHTS) and 0 < dying.sent < (served[0] / WEIGHTS).stat().st_size  # it did die
    assert mirror.asked(WEIGHTS)  # the weights came from the mirror
    verify_manifest(base.path, served[1])
    assert _empty_but(bases, base.path)  # no partial file, no staging directory
    assert follower.sources.failures(dying.source()) >= 1  # a transfer failure: retried after backoff
    assert not follower.sources.is_distrusted(dying.source())


def test_a_failed_source_is_retried_after_its_backoff_while_a_wrong_one_is_skipped(
    served: Served, donors: Callable[..., Donor], swarm: Any, tmp_path: Path
) -> None:
    host, join = swarm
    flaky = donors("serve", fail_first=2)  # refuses twice, then serves
    tampered = donors("serve")
    data = bytearray((tampered.root / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (tampered.root / WEIGHTS).write_bytes(bytes(data))  # same size, wrong sha256
    _announce(join(), flaky.source(), coordinator=served[2])
    _announce(join(), tampered.source())
    _visible(host, 2)
    follower = BaseFollower(host, tmp_path / "bases", 0, served[1], interval_s=0.05, fetch=FAST)
    follower.start()
    try:
        wait_for(follower.has_ready, 60, "the follower fetched generation 1 from the flaky source")
    finally:
        follower.stop()
    base = follower.take()
    assert base is not None and _empty_but(tmp_path / "bases", base.path)
    tries = flaky.asked(MANIFEST_FILE)
    assert len(tries) == 3 and flaky.asked(WEIGHTS)  # two refusals, then the whole generation
    assert min(b - a for a, b in itertools.pairwise(tries)) >= 0.5 * FAST.fetch_backoff_s
    assert len(tampered.asked(WEIGHTS)) == 1  # distrusted after its wrong weights, never asked again
    assert follower.sources.is_distrusted(tampered.source())


def test_a_trickling_donor_is_abandoned_by_its_deadline(
    served: Served, donors: Callable[..., Donor], tmp_path: Path
) -> None:
    donor = donors("trickle")
    cfg = FetchConfig(fetch_timeout_s=30, fetch_min_rate=1e7, fetch_grace_s=1.0)
    size = (served[0] / WEIGHTS).stat().st_size
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"model\.safetensors is too slow"):
        fetch_base(donor.source(), tmp_path / "bases", served[1], cfg)
    elapsed = time.monotonic() - started
    deadline = cfg.fetch_grace_s + size / cfg.fetch_min_rate
    assert deadline <= elapsed < deadline + 5  # the deadline, not the socket timeout, nor the whole trickle
    assert _empty_but(tmp_path / "bases")


def test_a_file_longer_than_declared_is_refused_without_reading_it_all(
    served: Served, donors: Callable[..., Donor], tmp_path: Path
) -> None:
    size = (served[0] / WEIGHTS).stat().st_size
    endless = donors("endless")
    with pytest.raises(ManifestError, match=rf"model\.safetensors is larger than its declared {size} bytes"):
        fetch_base(endless.source(), tmp_path / "bases", served[1], FAST)
    wait_for(endless.done.is_set, 30, "the endless donor noticed the client hung up")
    assert endless.sent < size + (64 << 20)  # what socket buffers hold, far from the 1 GiB it would send
    liar = donors("liar")
    started = time.monotonic()
    with pytest.raises(ManifestError, match=rf"is {size + 1} bytes, more than its declared {size} bytes"):
        fetch_base(liar.source(), tmp_path / "bases", served[1], FAST)
    assert time.monotonic() - started < FAST.fetch_timeout_s / 2  # refused on its header, before any body
    assert _empty_but(tmp_path / "bases")


def test_a_redirecting_source_is_a_failed_transfer_and_its_target_is_never_asked(
    served: Served, donors: Callable[..., Donor], tmp_path: Path
) -> None:
    target = donors("serve")  # a real copy elsewhere: following the redirect would fetch and verify it
    redirecting = donors("redirect", root=target.root)
    redirecting.redirect_to = target.url
    with pytest.raises(FetchError, match=r"manifest\.json: HTTP Error 302: redirect to .* refused"):
        fetch_base(redirecting.source(), tmp_path / "bases", served[1], FAST)
    assert redirecting.asked(MANIFEST_FILE) and not target.requests
    assert _empty_but(tmp_path / "bases")


def test_an_interrupted_download_leaves_nothing_in_the_cache(
    served: Served, donors: Callable[..., Donor], tmp_path: Path
) -> None:
    bases = tmp_path / "bases"
    with pytest.raises(FetchError, match=r"ended after \d+ of \d+ bytes"):  # the donor died half-way
        fetch_base(donors("die").source(), bases, served[1], FAST)
    assert _empty_but(bases)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # Ctrl+C while the weights trickle in
    try:
        with pytest.raises(KeyboardInterrupt):
            fetch_base(donors("trickle").source(), bases, served[1], FAST)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _empty_but(bases)


def test_a_killed_download_is_cleaned_when_the_follower_starts(
    served: Served, donors: Callable[..., Donor], swarm: Any, tmp_path: Path
) -> None:
    bases = tmp_path / "bases"
    code = (
        "import sys; from pathlib import Path; from cogen.node.follow import fetch_base; "
        "from cogen.protocols import CheckpointSource; "
        "fetch_base(CheckpointSource.model_validate_json(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])"
    )
    source = donors("trickle").source()
    child = subprocess.Popen([sys.executable, "-c", code, source.model_dump_json(), str(bases), served[1]])
    try:
        partial = wait_for(
            lambda: [p for p in bases.glob(".gen-*/" + WEIGHTS) if p.stat().st_size], 60,
            "the child is downloading the weights", alive=[child],
        )  # fmt: skip
    finally:
        child.kill()
        child.wait(10)
    staging = partial[0].parent
    assert staging.is_dir()  # SIGKILL ran no cleanup
    with staging_dir(bases, "gen-live") as live:  # another process's download in progress is kept
        old = time.time() - 3600
        for p in (staging, live):
            os.utime(p, (old, old))  # both are older than the guard for freshly created ones
        follower = BaseFollower(swarm[0], bases, 0, served[1], interval_s=60)
        follower.start()
        follower.stop()
        assert not staging.exists() and live.is_dir()
    assert _empty_but(bases)
    assert remove_stale_staging(bases) == []


def test_an_old_manifest_without_sizes_still_verifies_and_is_fetched_under_the_cap(
    served: Served, donors: Callable[..., Donor], tmp_path: Path
) -> None:
    published, key, _ = served
    old = Path(shutil.copytree(published, tmp_path / "v1"))
    raw = json.loads((old / MANIFEST_FILE).read_text())
    assert raw["manifest_version"] == 4 and raw["sizes"][WEIGHTS] == (old / WEIGHTS).stat().st_size
    del raw["sizes"], raw["reproduction"]
    raw["manifest_version"] = 1
    identity = Identity.load_or_create(published.parents[2] / "id.pem")  # the key that signed it
    signed = sign_manifest(Manifest.model_validate(raw), identity)
    data = signed.model_dump(mode="json")
    assert "sizes" not in json.loads(signed.canonical_bytes())  # signed exactly as a version 1 cogen did
    del data["sizes"], data["reproduction"]
    (old / MANIFEST_FILE).write_text(json.dumps(data))
    manifest = verify_manifest(old, key)
    assert manifest.manifest_version == 1 and manifest.declared_size(WEIGHTS) is None
    donor = donors(root=old)
    base = fetch_base(donor.source(), tmp_path / "bases", key, FAST)
    assert base.manifest.manifest_version == 1 and sha256_file(base.path / WEIGHTS) == sha256_file(
        old / WEIGHTS
    )
    small = FetchConfig(max_unsized_file_bytes=(old / WEIGHTS).stat().st_size - 1)
    with pytest.raises(ManifestError, match="cap of unsized files"):
        fetch_base(donor.source(), tmp_path / "other", key, small)
    assert _empty_but(tmp_path / "other")


def test_a_full_disk_is_this_hosts_failure_and_leaves_nothing(
    served: Served, donors: Callable[..., Donor], tmp_path: Path
) -> None:
    """The kernel refuses writes past RLIMIT_FSIZE (EFBIG), as it would a full disk (ENOSPC)."""
    code = """if True:
        import json, resource, signal, sys
        from pathlib import Path
        from cogen.node.fetch import FetchError, fetch_base
        from cogen.protocols import CheckpointSource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        try:
            fetch_base(CheckpointSource.model_validate_json(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
        except FetchError as e:
            print(json.dumps({"local": e.local, "error": str(e)}))
    """
    bases = tmp_path / "bases"
    source = donors("serve").source()
    out = subprocess.run(
        [sys.executable, "-c", code, source.model_dump_json(), str(bases), served[1]],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["local"] and "cannot write" in result["error"] and WEIGHTS in result["error"]
    assert _empty_but(bases)
