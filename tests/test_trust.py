"""A node follows the one manifest key it trusts: given, or pinned on first use and kept across restarts.

Real parts: a hivemind DHT on 127.0.0.1 with one peer per party (the node, two coordinators with their
own keys, forgers), signed records, real HTTP donors serving real published generations.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from donors import WEIGHTS, Donor, announce_swarm, swarm_of
from hivemind.utils import get_dht_time
from merging_helpers import make_expert, merge_config

from cogen.coordinator.merging import Identity, merge_experts
from cogen.coordinator.merging.manifest import sign_manifest
from cogen.core.atomic import write_json_atomic
from cogen.core.compatibility import check_compatible
from cogen.core.config import FetchConfig
from cogen.core.exit_codes import ExitCode
from cogen.core.procs import wait_for
from cogen.core.settings import ConfigError
from cogen.core.swarm import SwarmClient
from cogen.node.follow import BaseFollower
from cogen.node.trust import TRUST_FILE, KeyTrust, read_trusted_key
from cogen.protocols import CheckpointSource, SwarmInfo
from cogen.protocols.keys import swarm_key
from cogen.protocols.manifest import MANIFEST_FILE, read_manifest
from cogen.protocols.version import PROTOCOL_VERSION, IncompatibleProtocolError

FAST = FetchConfig(fetch_timeout_s=20, fetch_backoff_s=0.5, fetch_backoff_max_s=1.0)
FOREIGN = "ignoring a coordinator that announces manifest key"


@pytest.fixture(scope="module")
def published(
    tiny_path: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Identity, Identity]:
    """Generation 1 signed by coordinator A's key, and a generation 2 signed by coordinator B's."""
    root = tmp_path_factory.mktemp("trust")
    experts = (make_expert(tiny_path, root / "a", 1), make_expert(tiny_path, root / "b", 2, expert="code"))
    first = merge_experts(
        merge_config(experts=experts, method="ties", out=root / "out", identity=root / "a.pem")
    )
    a, b = Identity.load_or_create(root / "a.pem"), Identity.load_or_create(root / "b.pem")
    second = Path(shutil.copytree(first, root / "gen2"))
    newer = read_manifest(second).model_copy(update={"generation": 2})
    write_json_atomic(second / MANIFEST_FILE, sign_manifest(newer, b).model_dump(mode="json"))
    return first, second, a, b


@pytest.fixture
def swarm(request: pytest.FixtureRequest) -> Iterator[tuple[SwarmClient, Callable[[], SwarmClient]]]:
    with swarm_of(request.node.name) as swarm:
        yield swarm


def _serve(client: SwarmClient, donor: Donor, generation: int, time_ahead_s: float = 0.0) -> CheckpointSource:
    source = donor.source(generation).model_copy(
        update={"peer_id": client.peer_id, "time": get_dht_time() + time_ahead_s}
    )
    client.publish(source).result()
    return source


def _foreign_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(FOREIGN in r.getMessage() for r in caplog.records)


def test_a_second_coordinator_and_forged_sources_are_ignored_before_and_after_a_restart(
    published: tuple[Path, Path, Identity, Identity],
    swarm: tuple[SwarmClient, Callable[[], SwarmClient]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, a, b = published
    host, join = swarm
    coordinator_a, coordinator_b, forger, skewed = join(), join(), join(), join()
    donor_a = Donor(Path(shutil.copytree(first, tmp_path / "donor-a")))
    donor_b = Donor(Path(shutil.copytree(second, tmp_path / "donor-b")))
    bogus = [Donor(Path(shutil.copytree(second, tmp_path / f"bogus-{i}"))) for i in range(2)]
    out, bases, swarm_name = tmp_path / "node", tmp_path / "bases", host.cfg.swarm
    caplog.set_level(logging.INFO, logger="cogen.node")
    try:
        # coordinator A: its record expires (ttl 20 s) while its generation 1 stays announced
        announce_swarm(coordinator_a, a, ttl_s=20)
        _serve(coordinator_a, donor_a, 1)
        wait_for(lambda: host.fetch(SwarmInfo) and host.fetch(CheckpointSource), 30, "A's records visible")
        trust = KeyTrust.from_config(None, out, swarm_name)
        assert trust.key is None  # a first start: nothing pinned yet
        follower = BaseFollower(host, bases, 0, trust, interval_s=0.1, fetch=FAST)
        follower.start()
        try:
            wait_for(follower.has_ready, 60, "generation 1 fetched from coordinator A")
            base = follower.take()
            assert base is not None and base.generation == 1  # the node moves to it
            assert (out / TRUST_FILE.format(swarm=swarm_name)).read_text().strip() == a.public_key
            wait_for(lambda: not host.fetch(SwarmInfo), 60, "coordinator A's SwarmInfo expired")

            # now B's is the only key announced; a forger replays A's key and signature under its own
            # record; out-of-bounds sources: a generation far ahead, one from an hour in the future
            announce_swarm(coordinator_b, b)
            source_b = _serve(coordinator_b, donor_b, 2)
            replayed = host.fetch(SwarmInfo)
            forged = SwarmInfo(
                swarm=swarm_name, coordinator_peer_id=forger.peer_id, manifest_key=a.public_key,
                owner_signature=a.sign_owner(swarm_name, coordinator_a.owner), software_version="test",
                started_at=time.time(), updated_at=time.time(),
            )  # fmt: skip
            forger.publish(forged).result()
            _serve(forger, bogus[0], 7)
            _serve(skewed, bogus[1], 2, time_ahead_s=3600)
            wait_for(lambda: len(host.fetch(SwarmInfo)) == 2 and len(host.fetch(CheckpointSource)) == 4, 30,
                     "B's, the forger's and the skewed records visible")  # fmt: skip
            assert replayed and all(e.owner == coordinator_b.owner for e in replayed)
            wait_for(lambda: follower.sources.is_distrusted(source_b), 60, "B's manifest refused")
            looks = follower.looks
            wait_for(lambda: follower.looks >= looks + 5, 60, "five more looks")
            assert trust.coordinators(swarm_name, host.fetch(SwarmInfo)) == set()  # neither B nor the forger
        finally:
            follower.stop()
        assert follower.generation == 1 and not follower.has_ready()
        assert donor_b.asked(MANIFEST_FILE) and not donor_b.asked(WEIGHTS)  # refused on its signature
        assert not bogus[0].requests and not bogus[1].requests  # out of bounds: never asked at all
        assert _foreign_warnings(caplog) == 1  # once for B's key, not once per look
        assert sum("ignoring the announced source" in r.getMessage() for r in caplog.records) == 2

        # a restart reads the pinned key back and goes on ignoring B
        caplog.clear()
        again = KeyTrust.from_config(None, out, swarm_name)
        assert again.key == a.public_key
        restarted = BaseFollower(host, bases, 1, again, interval_s=0.1, fetch=FAST)
        restarted.start()
        try:
            wait_for(lambda: restarted.looks >= 5, 60, "five looks after the restart")
        finally:
            restarted.stop()
        assert restarted.generation == 1 and not restarted.has_ready() and not donor_b.asked(WEIGHTS)
        assert _foreign_warnings(caplog) == 1
        assert (out / TRUST_FILE.format(swarm=swarm_name)).read_text().strip() == a.public_key
    finally:
        for donor in (donor_a, donor_b, *bogus):
            donor.stop()


def test_a_given_key_wins_and_bad_ones_are_one_line_config_errors(
    published: tuple[Path, Path, Identity, Identity], tmp_path: Path
) -> None:
    a = published[2]
    (tmp_path / "a.pub").write_text(a.public_key + "\n")
    assert read_trusted_key(str(tmp_path / "a.pub")) == a.public_key == read_trusted_key(a.public_key)
    given = KeyTrust.from_config(str(tmp_path / "a.pub"), tmp_path / "node", "s")
    assert given.key == a.public_key and given.pin_file is None
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAAnot-a-key\n")
    with pytest.raises(ConfigError, match="cannot read it as a key file"):
        read_trusted_key(str(tmp_path / "missing.pub"))
    with pytest.raises(ConfigError, match="not a valid RSA public key"):
        read_trusted_key(str(tmp_path / "bad.pub"))
    with pytest.raises(ConfigError, match="not an OpenSSH RSA public key"):
        read_trusted_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA")
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / TRUST_FILE.format(swarm="s")).write_text("garbage")
    with pytest.raises(ConfigError, match=r"pinned manifest key .* is unusable"):
        KeyTrust.from_config(None, tmp_path / "node", "s")

    for bad in (str(tmp_path / "missing.pub"), str(tmp_path / "bad.pub")):
        argv = ["--trusted-key", bad, "--output-dir", str(tmp_path / "n")]
        run = subprocess.run(
            [sys.executable, "-m", "cogen.node.cli", *argv], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == ExitCode.CONFIG, run.stderr
        errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and f"--trusted-key {bad}" in errors[0], run.stderr


def test_only_the_trusted_coordinator_can_say_the_swarm_speaks_another_protocol(
    swarm: tuple[SwarmClient, Callable[[], SwarmClient]], tmp_path: Path
) -> None:
    host, join = swarm
    rogue = join()
    trusted = Identity.load_or_create(tmp_path / "trusted.pem")
    key = swarm_key(host.cfg.swarm, SwarmInfo.KIND)
    other = {"protocol_version": PROTOCOL_VERSION + 1, "software_version": "9.9.9"}
    assert rogue.dht.store(key, other, get_dht_time() + 60, subkey=rogue.owner)
    with pytest.raises(IncompatibleProtocolError, match=r"9\.9\.9"):  # first contact: nothing to tell it by
        wait_for(lambda: check_compatible(host) or None, 20, "the announcement to arrive")
    check_compatible(host, trusted.public_key)  # a node that trusts a key ignores a stranger's claim
    vouched = {**other, "owner_signature": trusted.sign_owner(host.cfg.swarm, rogue.owner)}
    assert rogue.dht.store(key, vouched, get_dht_time() + 61, subkey=rogue.owner)
    with pytest.raises(IncompatibleProtocolError, match=r"9\.9\.9"):  # the trusted coordinator is believed
        wait_for(lambda: check_compatible(host, trusted.public_key) or None, 20, "the vouched announcement")
