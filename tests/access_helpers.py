"""What the permissioned-swarm tests share: the swarm owner's directory (made by the real
``cogen swarm``), members' credentials, and a log of every authorizer refusal from every process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cogen.app.swarm import main as swarm_main
from cogen.core.access import read_model
from cogen.core.access_config import AccessConfig
from cogen.core.config import NetworkConfig
from cogen.core.exit_codes import ExitCode
from cogen.protocols import Credential

SWARM = "test"
TTL_S = 6.0  # every third of it members refresh the revocation list and the member directory


@dataclass(frozen=True)
class Owner:
    dir: Path
    log: Path  # the authorizers' refusals, from every process

    @property
    def pub(self) -> Path:
        return self.dir / "owner.pub"

    @property
    def revocations(self) -> Path:
        return self.dir / "revocations.json"

    def member(self, name: str, expires_in: str = "1h") -> AccessConfig:
        key = self.dir.parent / f"{name}.key"
        assert swarm_main(["key", str(key)]) == ExitCode.OK
        out = self.dir.parent / f"{name}.credential.json"
        argv = ["issue", "--owner-dir", str(self.dir), "--member-key", f"{key}.pub", "--name", name]
        assert swarm_main([*argv, "--expires-in", expires_in, "--out", str(out)]) == ExitCode.OK
        return AccessConfig(owner_key=self.pub, credential=out, credential_key=key)

    def serial(self, access: AccessConfig) -> int:
        assert access.credential is not None
        return read_model(access.credential, Credential, "credential").serial


@pytest.fixture(scope="module", name="owner")
def owner_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owner]:
    root = tmp_path_factory.mktemp("access")
    assert swarm_main(["init", "--swarm", SWARM, "--owner-dir", str(root / "owner")]) == ExitCode.OK
    handler = logging.FileHandler(root / "refusals.log")  # forked DHT and averager processes inherit it
    authorizer_log = logging.getLogger("cogen.core.authorizer")
    authorizer_log.addHandler(handler)
    yield Owner(root / "owner", root / "refusals.log")
    authorizer_log.removeHandler(handler)


def net(access: AccessConfig | None = None, initial: list[str] | None = None) -> NetworkConfig:
    return NetworkConfig(
        swarm=SWARM, host="127.0.0.1", initial_peers=tuple(initial or ()), record_ttl_s=TTL_S,
        access=access or AccessConfig(),
    )  # fmt: skip
