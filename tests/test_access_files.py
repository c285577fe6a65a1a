"""A permissioned swarm's files and flags: credentials checked under the owner key, one-line errors
(exit code 2) for bad key or credential files, the access flags of nodes and the coordinator, and
``--checkpoint-auth`` on the coordinator's ``/checkpoints/`` and a node's base mirror."""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from access_helpers import SWARM, TTL_S, Owner, net, owner_fixture  # noqa: F401 - the owner fixture
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from cogen.app.swarm import main as swarm_main
from cogen.coordinator.api import PublishedFiles
from cogen.coordinator.config import CoordinatorConfig
from cogen.core.access import (
    Access,
    AccessError,
    credential_of,
    credential_refusal,
    issue_credential,
    load_private_key,
    sign_revocations,
    token_of,
)
from cogen.core.access_config import AccessConfig
from cogen.core.authorizer import SwarmAuthorizer
from cogen.core.config import NodeConfig
from cogen.core.exit_codes import ExitCode
from cogen.core.http_access import CREDENTIAL_HEADER, credential_headers, register, request_for, unregister
from cogen.core.settings import add_config_arguments, build_config
from cogen.core.swarm import SwarmClient
from cogen.node.follow import MirrorServer

pytestmark = pytest.mark.slow


def test_credentials_are_checked_under_the_owner_key(owner: Owner) -> None:
    access = owner.member("checked")
    a = Access.load(access, SWARM)
    assert a is not None
    key, now = load_private_key(owner.dir / "owner.key"), time.time()
    good = issue_credential(key, SWARM, 99, "x", a.credential.member_key, int(now) + 60)
    assert credential_refusal(good, a.owner_key, SWARM, frozenset(), now) is None
    assert credential_of(token_of(good)) == good  # the AccessToken hivemind sends carries it whole
    forged = good.model_copy(update={"name": "y"})
    assert "not signed" in str(credential_refusal(forged, a.owner_key, SWARM, frozenset(), now))
    other = issue_credential(a.member_key, SWARM, 99, "x", a.credential.member_key, int(now) + 60)
    assert "not signed" in str(credential_refusal(other, a.owner_key, SWARM, frozenset(), now))
    assert "swarm" in str(credential_refusal(good, a.owner_key, "other", frozenset(), now))
    assert "expired" in str(credential_refusal(good, a.owner_key, SWARM, frozenset(), now + 61))
    assert "revoked" in str(credential_refusal(good, a.owner_key, SWARM, frozenset({99}), now))
    assert credential_refusal(None, a.owner_key, SWARM, frozenset(), now) == "no credential"
    assert credential_of(token_of(good).__class__(username="a b", public_key=b"\xff")) is None


def test_bad_key_and_credential_files_are_one_line_errors(
    owner: Owner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    access = owner.member("files")
    assert access.credential_key is not None and access.credential is not None
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    capsys.readouterr()
    assert swarm_main(["list", "--owner-dir", str(owner.dir)]) == ExitCode.OK
    listed = {line.split()[1]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed["files"] == "valid"
    issue = ["issue", "--owner-dir", str(owner.dir), "--name", "x", "--expires-in", "1h"]
    assert swarm_main([*issue, "--member-key", str(access.credential_key)]) == ExitCode.CONFIG
    assert swarm_main(["list", "--owner-dir", str(tmp_path)]) == ExitCode.CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("cogen swarm: access error: " in line for line in lines), lines
    assert "not an OpenSSH RSA public key" in lines[0] and "not an owner directory" in lines[1]
    cases = {
        "credential": dict(credential=garbage),
        "private key": dict(credential_key=garbage),
        "public key": dict(owner_key=garbage),
        "another key": dict(credential_key=owner.dir.parent / "checked.key"),  # not the credential's key
        "need --owner-key": dict(owner_key=None),
    }
    for expected, change in cases.items():
        with pytest.raises(AccessError, match=expected) as err:
            Access.load(access.model_copy(update=change), SWARM)
        assert err.value.exit_code == ExitCode.CONFIG and "\n" not in str(err.value)
    with pytest.raises(AccessError, match="not a credential"):  # before any DHT starts
        SwarmClient(net(access.model_copy(update={"credential": garbage})))


@pytest.mark.parametrize("config", [NodeConfig, CoordinatorConfig])
def test_nodes_and_the_coordinator_take_the_access_flags(config: type[BaseModel], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config)
    flags = ["--owner-key", "o.pub", "--credential", "c.json", "--credential-key", "k.key"]
    args = parser.parse_args([*flags, "--revocations", "r.json", "--checkpoint-auth"])
    access = build_config(config, args, environ={}).network.access  # type: ignore[attr-defined]
    assert access == AccessConfig(
        owner_key=Path("o.pub"), credential=Path("c.json"), credential_key=Path("k.key"),
        revocations=Path("r.json"), checkpoint_auth=True,
    )  # fmt: skip
    assert build_config(config, parser.parse_args([]), environ={}).network.access == AccessConfig()  # type: ignore[attr-defined]


def test_checkpoint_downloads_need_a_members_signed_header(owner: Owner, tmp_path: Path) -> None:
    """``--checkpoint-auth``: the node's base mirror and the coordinator's ``/checkpoints/`` answer 403
    unless the request carries a valid member's credential and a fresh proof of its key."""
    member = Access.load(owner.member("fetcher").model_copy(update={"checkpoint_auth": True}), SWARM)
    assert member is not None
    authorizer = SwarmAuthorizer(member, TTL_S)
    (tmp_path / "gen-000001").mkdir()
    (tmp_path / "gen-000001" / "manifest.json").write_text("{}")
    app = FastAPI()
    app.mount("/checkpoints", PublishedFiles(tmp_path, lambda: {"gen-000001"}), name="checkpoints")
    mirror = MirrorServer(tmp_path, "127.0.0.1")
    mirror.start()
    register(member, authorizer)
    try:
        api = TestClient(app)
        mirror_url = f"{mirror.url}gen-000001/manifest.json"

        def status(headers: dict[str, str] | None, where: str = "mirror") -> int:
            if where == "api":
                return api.get("/checkpoints/gen-000001/manifest.json", headers=headers or {}).status_code
            try:
                with urllib.request.urlopen(urllib.request.Request(mirror_url, headers=headers or {})) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code

        signed = dict(request_for(mirror_url).header_items())
        path = "/checkpoints/gen-000001/manifest.json"
        assert status(signed) == 200 and status(credential_headers(member, path), "api") == 200
        assert status(None) == 403 and status(None, "api") == 403  # a stranger
        other = Access.load(owner.member("other"), SWARM)
        assert other is not None
        forged = {
            **credential_headers(other, "/gen-000001/manifest.json"),
            CREDENTIAL_HEADER: signed[CREDENTIAL_HEADER.capitalize()],
        }
        assert status(forged) == 403  # a member's credential without its key
        stale = credential_headers(member, "/gen-000001/manifest.json", now=time.time() - 600)
        assert status(stale) == 403
        assert (
            status(credential_headers(member, "/gen-000002/manifest.json")) == 403
        )  # signed for another path
        key = load_private_key(owner.dir / "owner.key")
        authorizer.apply_revocations(
            sign_revocations(key, SWARM, {member.credential.serial}, int(time.time()))
        )
        assert status(dict(request_for(mirror_url).header_items())) == 403  # revoked
        assert status(credential_headers(member, path), "api") == 403
        assert "checkpoint download: credential" in owner.log.read_text()
    finally:
        unregister(member)
        mirror.stop()
    assert request_for(mirror_url).header_items() == []  # an open swarm's requests carry nothing
