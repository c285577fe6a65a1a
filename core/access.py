"""A permissioned swarm's keys, credentials and revocation list: files, signatures and their checks.

The swarm owner holds an RSA key (``cogen swarm init``); a member's credential
(:class:`cogen.protocols.Credential`) is the owner's signature on the member's public key, a serial, a
name and an expiry; the owner's signed :class:`cogen.protocols.Revocations` names revoked serials. Keys
are PEM files (private: mode 0600) and one-line OpenSSH public keys (hivemind's ``RSAPublicKey`` format).
A bad file is a one-line :class:`AccessError` (exit code 2). :class:`Access` is what a peer loads
from its :class:`cogen.core.access_config.AccessConfig`; :mod:`cogen.core.authorizer` enforces it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import BaseModel, ValidationError

from cogen.core.access_config import AccessConfig
from cogen.core.atomic import create_private_once
from cogen.core.settings import ConfigError
from cogen.protocols import Credential, Revocations

M = TypeVar("M", bound=BaseModel)
MAX_FILE_BYTES = 8 << 20  #: no key, credential or revocation file is larger


class AccessError(ConfigError):
    """A key, credential or revocation file that cannot be used (one line; exit code 2)."""

    what = "access"


def _read(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise AccessError(f"cannot read the {what} {path}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise AccessError(f"the {what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def create_key(path: Path) -> bool:
    """Write a new RSA private key to ``path`` (PEM, mode 0600) unless one is there; True if created."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return create_private_once(Path(path), lambda tmp: tmp.write_bytes(pem))


def load_private_key(path: Path) -> RSAPrivateKey:
    """The RSA private key in the PEM file ``path``, as hivemind's ``RSAPrivateKey``."""
    path = Path(path)
    if path.is_file() and path.stat().st_mode & 0o077:
        raise AccessError(f"the private key {path} is readable by others: chmod 600 it")
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise AccessError(f"{path} is not an unencrypted PEM private key: {str(e).splitlines()[0]}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise AccessError(f"{path} holds a {type(key).__name__}, not an RSA key")
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    hivemind_key = RSAPrivateKey.__new__(RSAPrivateKey)
    hivemind_key.__setstate__({"_private_key": der})  # hivemind's own way of restoring a key
    return hivemind_key


def public_key_line(key: RSAPrivateKey) -> str:
    """The one-line OpenSSH public key of ``key`` (what a credential names)."""
    return key.get_public_key().to_bytes().decode()


def load_public_key(path: Path) -> str:
    """The one-line OpenSSH RSA public key in ``path`` (checked to parse)."""
    text = _read(Path(path), "public key").decode(errors="replace").strip()
    line = " ".join(text.split()[:2])  # drop an OpenSSH comment
    try:
        RSAPublicKey.from_bytes(line.encode())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        raise AccessError(f"{path} is not an OpenSSH RSA public key (one line: ssh-rsa AAAA...)") from None
    return line


def key_fingerprint(public_key: str) -> str:
    """A short name for a one-line public key (the start of its sha256)."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]


def _verify(owner_key: str, data: bytes, signature: str) -> bool:
    try:
        return RSAPublicKey.from_bytes(owner_key.encode()).verify(data, signature.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def issue_credential(
    owner: RSAPrivateKey, swarm: str, serial: int, name: str, member_key: str, expires_at: int
) -> Credential:
    """The owner's credential for ``member_key`` (raises ``ValueError`` on a bad field)."""
    unsigned = Credential(
        swarm=swarm, serial=serial, name=name, member_key=member_key, expires_at=expires_at, signature="A"
    )
    return unsigned.model_copy(update={"signature": owner.sign(unsigned.signed_bytes()).decode()})


def credential_refusal(
    credential: Credential | None, owner_key: str, swarm: str, revoked: frozenset[int], now: float
) -> str | None:
    """Why ``credential`` does not admit its holder to ``swarm`` under ``owner_key``, or None if it does."""
    if credential is None:
        return "no credential"
    if credential.swarm != swarm:
        return f"credential {credential.serial} is for swarm {credential.swarm!r}"
    if not _verify(owner_key, credential.signed_bytes(), credential.signature):
        return f"credential {credential.serial} is not signed by this swarm's owner"
    if credential.expires_at <= now:
        return f"credential {credential.serial} ({credential.name}) expired"
    if credential.serial in revoked:
        return f"credential {credential.serial} ({credential.name}) is revoked"
    return None


def token_of(credential: Credential) -> AccessToken:
    """``credential`` as hivemind's ``AccessToken`` (what ``TokenAuthorizerBase`` sends)."""
    return AccessToken(
        username=f"{credential.swarm} {credential.serial} {credential.name}",
        public_key=credential.member_key.encode(),
        expiration_time=str(credential.expires_at),
        signature=credential.signature.encode(),
    )


def credential_of(token: AccessToken) -> Credential | None:
    """The credential inside a peer's ``AccessToken``, or None if it is not a well-formed one."""
    parts = token.username.split(" ")
    if len(parts) != 3 or not parts[1].isdigit() or not token.expiration_time.isdigit():
        return None
    try:
        return Credential(
            swarm=parts[0],
            serial=int(parts[1]),
            name=parts[2],
            member_key=token.public_key.decode(),
            expires_at=int(token.expiration_time),
            signature=token.signature.decode(),
        )
    except (ValidationError, UnicodeDecodeError, ValueError):
        return None


def sign_revocations(owner: RSAPrivateKey, swarm: str, serials: set[int], issued_at: int) -> Revocations:
    unsigned = Revocations(swarm=swarm, serials=tuple(sorted(serials)), issued_at=issued_at, signature="")
    return unsigned.model_copy(update={"signature": owner.sign(unsigned.signed_bytes()).decode()})


def revocations_valid(revocations: Revocations, owner_key: str, swarm: str) -> bool:
    return revocations.swarm == swarm and _verify(
        owner_key, revocations.signed_bytes(), revocations.signature
    )


def read_model(path: Path, schema: type[M], what: str) -> M:
    """A strict ``schema`` instance from the JSON file ``path``."""
    try:
        return schema.model_validate_json(_read(Path(path), what), strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise AccessError(f"{path} is not a {what}: {where}: {first['msg']}") from None


def read_revocations(path: Path, owner_key: str, swarm: str) -> Revocations:
    revocations = read_model(path, Revocations, "revocation list")
    if not revocations_valid(revocations, owner_key, swarm):
        raise AccessError(f"the revocation list {path} is not signed by this swarm's owner")
    return revocations


@dataclass(frozen=True)
class Access:
    """What a peer of a permissioned swarm holds: its key, its credential, the owner's public key."""

    swarm: str
    owner_key: str
    credential: Credential
    member_key: RSAPrivateKey
    revocations: Path | None
    checkpoint_auth: bool

    @classmethod
    def load(cls, cfg: AccessConfig, swarm: str) -> Access | None:
        """The peer's access from ``cfg``; None for an open swarm. Raises :class:`AccessError`."""
        if cfg.owner_key is None:
            if cfg.credential or cfg.revocations or cfg.checkpoint_auth:
                raise AccessError("--credential, --revocations and --checkpoint-auth need --owner-key")
            return None
        if cfg.credential is None or cfg.credential_key is None:
            raise AccessError("a permissioned swarm (--owner-key) needs --credential and --credential-key")
        owner_key = load_public_key(cfg.owner_key)
        credential = read_model(cfg.credential, Credential, "credential")
        key = load_private_key(cfg.credential_key)
        if public_key_line(key) != credential.member_key:
            raise AccessError(f"the credential {cfg.credential} names another key than {cfg.credential_key}")
        reason = credential_refusal(credential, owner_key, swarm, frozenset(), time.time())
        if reason:
            raise AccessError(f"{cfg.credential}: {reason}")
        if cfg.revocations is not None:
            read_revocations(cfg.revocations, owner_key, swarm)
        return cls(swarm, owner_key, credential, key, cfg.revocations, cfg.checkpoint_auth)
