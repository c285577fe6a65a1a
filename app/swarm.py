"""``cogen swarm``: the owner's side of a permissioned swarm, and a member's key.

The owner's directory (``--owner-dir``, default ``./swarm-owner``) holds ``owner.key`` (0600),
``owner.pub`` (what every peer pins with ``--owner-key``), ``issued.json`` (every credential issued)
and ``revocations.json`` (the signed revocation list the coordinator publishes with
``--revocations``). Commands: ``init``, ``key`` (a member's key pair), ``issue``, ``list``, ``revoke``.
A bad key or credential file is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cogen.core.cli_common import run_main
from cogen.core.exit_codes import ExitCode
from cogen.core.telemetry import setup_logging

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90d, 12h, 30m or 3600")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogen swarm", description="Keys and credentials of a permissioned swarm (see README)."
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="action", required=True)
    owner = argparse.ArgumentParser(add_help=False)
    owner.add_argument("--owner-dir", type=Path, default=Path("swarm-owner"), help="the owner's directory")
    init = sub.add_parser("init", parents=[owner], help="create the owner key of a new permissioned swarm")
    init.add_argument("--swarm", required=True, help="the swarm's name (its --swarm)")
    key = sub.add_parser("key", help="create a member's key pair (PATH, PATH.pub) and print the public key")
    key.add_argument("path", type=Path, help="the private key file (kept on the member's machine)")
    issue = sub.add_parser("issue", parents=[owner], help="issue a credential to a member's public key")
    issue.add_argument("--member-key", type=Path, required=True, help="the member's public key file (.pub)")
    issue.add_argument("--name", required=True, help="who holds it (lowercase, e.g. charite-node-1)")
    issue.add_argument("--expires-in", type=_duration, required=True, help="e.g. 90d, 12h, 30m, 3600 (s)")
    issue.add_argument("--out", type=Path, default=None, help="credential file (default: in --owner-dir)")
    sub.add_parser("list", parents=[owner], help="the credentials issued, with their status")
    revoke = sub.add_parser("revoke", parents=[owner], help="revoke a credential by its serial")
    revoke.add_argument("serial", type=int)
    return parser


@contextmanager
def _locked(owner_dir: Path) -> Iterator[None]:
    with open(owner_dir / ".lock", "a") as handle:  # one issue/revoke at a time: serials stay unique
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _swarm_of(owner_dir: Path) -> tuple[str, Any, str]:
    from cogen.core.access import AccessError, load_private_key, public_key_line

    info = owner_dir / "swarm.json"
    if not info.is_file():
        raise AccessError(f"{owner_dir} is not an owner directory (run cogen swarm init)")
    try:
        swarm = json.loads(info.read_text())["swarm"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AccessError(f"{info} does not name the swarm: {e}") from None
    key = load_private_key(owner_dir / "owner.key")
    return str(swarm), key, public_key_line(key)


def _issued(owner_dir: Path) -> list[Any]:
    from pydantic import TypeAdapter

    from cogen.core.access import AccessError
    from cogen.protocols import Credential

    path = owner_dir / "issued.json"
    try:
        return TypeAdapter(list[Credential]).validate_json(path.read_bytes(), strict=True)
    except (OSError, ValueError) as e:
        raise AccessError(f"{path} is not a list of credentials: {str(e).splitlines()[0]}") from None


def _init(args: argparse.Namespace) -> None:
    from cogen.core.access import AccessError, create_key, load_private_key, public_key_line, sign_revocations
    from cogen.core.atomic import write_json_atomic
    from cogen.protocols import check_swarm_name

    try:
        swarm = check_swarm_name(args.swarm)
    except ValueError as e:
        raise AccessError(str(e)) from None
    args.owner_dir.mkdir(parents=True, exist_ok=True)
    if not create_key(args.owner_dir / "owner.key"):
        raise AccessError(f"{args.owner_dir / 'owner.key'} exists: this directory already owns a swarm")
    key = load_private_key(args.owner_dir / "owner.key")
    (args.owner_dir / "owner.pub").write_text(public_key_line(key) + "\n")
    write_json_atomic(args.owner_dir / "swarm.json", {"swarm": swarm})
    write_json_atomic(args.owner_dir / "issued.json", [])
    empty = sign_revocations(key, swarm, set(), int(time.time()))
    write_json_atomic(args.owner_dir / "revocations.json", empty.model_dump(mode="json"))
    d = args.owner_dir
    print(f"swarm {swarm!r}: owner key {d / 'owner.key'} (keep it private); every peer pins --owner-key "
          f"{d / 'owner.pub'}; the coordinator publishes --revocations {d / 'revocations.json'}")  # fmt: skip


def _key(args: argparse.Namespace) -> None:
    from cogen.core.access import create_key, load_private_key, public_key_line

    args.path.parent.mkdir(parents=True, exist_ok=True)
    created = create_key(args.path)
    line = public_key_line(load_private_key(args.path))
    Path(f"{args.path}.pub").write_text(line + "\n")
    print(f"{'created' if created else 'kept'} {args.path}; public key in {args.path}.pub:\n{line}")


def _issue(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from cogen.core.access import AccessError, issue_credential, load_public_key
    from cogen.core.atomic import write_json_atomic

    swarm, key, _ = _swarm_of(args.owner_dir)
    member = load_public_key(args.member_key)
    with _locked(args.owner_dir):
        issued = _issued(args.owner_dir)
        serial = max((c.serial for c in issued), default=0) + 1
        try:
            credential = issue_credential(
                key, swarm, serial, args.name, member, int(time.time()) + args.expires_in
            )
        except ValidationError as e:
            first = e.errors()[0]
            raise AccessError(f"cannot issue: --{first['loc'][-1]}: {first['msg']}") from None
        write_json_atomic(
            args.owner_dir / "issued.json", [c.model_dump(mode="json") for c in [*issued, credential]]
        )
    out = args.out or args.owner_dir / "credentials" / f"{serial}-{args.name}.json"
    write_json_atomic(out, credential.model_dump(mode="json"))
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(credential.expires_at))
    print(f"credential {serial} for {args.name}, expires {expires}: {out}")


def _revoked(owner_dir: Path, swarm: str, owner_key: str) -> Any:
    from cogen.core.access import read_revocations

    return read_revocations(owner_dir / "revocations.json", owner_key, swarm)


def _list(args: argparse.Namespace) -> None:
    from cogen.core.access import key_fingerprint

    swarm, _, owner_key = _swarm_of(args.owner_dir)
    revoked = set(_revoked(args.owner_dir, swarm, owner_key).serials)
    print(f"{'serial':>6}  {'name':<24} {'key':<16}  {'expires (UTC)':<16}  status")
    for c in _issued(args.owner_dir):
        status = "revoked" if c.serial in revoked else "expired" if c.expires_at <= time.time() else "valid"
        expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.expires_at))
        print(f"{c.serial:>6}  {c.name:<24} {key_fingerprint(c.member_key):<16}  {expires:<16}  {status}")


def _revoke(args: argparse.Namespace) -> None:
    from cogen.core.access import AccessError, sign_revocations
    from cogen.core.atomic import write_json_atomic

    swarm, key, owner_key = _swarm_of(args.owner_dir)
    with _locked(args.owner_dir):
        if args.serial not in {c.serial for c in _issued(args.owner_dir)}:
            raise AccessError(f"no credential {args.serial} was issued from {args.owner_dir}")
        old = _revoked(args.owner_dir, swarm, owner_key)
        issued_at = max(int(time.time()), old.issued_at + 1)  # a newer list always replaces the old one
        new = sign_revocations(key, swarm, {*old.serials, args.serial}, issued_at)
        write_json_atomic(args.owner_dir / "revocations.json", new.model_dump(mode="json"))
    listed = args.owner_dir / "revocations.json"
    print(
        f"revoked credential {args.serial}: the coordinator publishes {listed}; members refuse it in one TTL"
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    actions = {"init": _init, "key": _key, "issue": _issue, "list": _list, "revoke": _revoke}

    def body() -> int:
        setup_logging(args.log_level)
        actions[args.action](args)
        return ExitCode.OK

    return run_main("cogen swarm", body)
