"""The signed manifest of a published base, and the coordinator's identity key that signs it.

``manifest.json`` records a generation's lineage (parent base and its hashes, the experts and their
hashes), how it was made (method, parameters, weights), how it scored (evaluation matrix, ranking), the
sha256 of every other file in the directory, and an RSA signature over the canonical JSON of all that
(sorted keys, no whitespace, the ``signature`` field left out). The signature scheme is hivemind's
(RSA-PSS over SHA-256, base64), so anyone verifies it with ``hivemind.utils.crypto.RSAPublicKey``.
hivemind's ``RSAPrivateKey`` cannot be loaded from a file, so the key itself is a PEM file read and
used with ``cryptography`` directly (:class:`Identity`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.utils.crypto import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogen.checkpoint import sha256_file
from cogen.coordinator.merging.weights import EvalMatrix
from cogen.protocols.version import software_version

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(RuntimeError):
    """A manifest is missing, malformed, unsigned or does not match the files (one line)."""


class ParentInfo(BaseModel):
    """The base the experts were trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="its name: an alias, a local directory or a hub id")
    generation: int = Field(ge=0, description="its generation (0: a pretrained model)")
    files: dict[str, str] = Field(default_factory=dict, description="weight file -> sha256, when local")
    manifest_sha256: str | None = Field(default=None, description="sha256 of its manifest.json, if any")


class ExpertEntry(BaseModel):
    """One expert that went into (or was left out of) the merge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="unique label in this merge (domain, -2/-3 on repeats)")
    expert: str = Field(description="the domain the expert was trained on")
    sha256: str = Field(description="sha256 of its adapter_model.safetensors")
    weight: float = Field(ge=0, description="its merge weight before the method's rescaling; 0: left out")
    steps: int = Field(ge=0)
    tokens: int = Field(ge=0)


class Manifest(BaseModel):
    """The signed record of one published generation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    generation: int = Field(ge=1)
    parent: ParentInfo
    experts: list[ExpertEntry]
    method: str
    params: dict[str, float | int | str] = Field(default_factory=dict)
    weight_source: str = Field(description="where the weights came from: flags, evaluation or equal")
    evaluation: EvalMatrix | None = None
    ranking: dict[str, list[str]] = Field(default_factory=dict, description="domain -> experts, best first")
    files: dict[str, str] = Field(description="every other file in the directory -> sha256")
    created_at: float = Field(default_factory=time.time)
    software_version: str = Field(default_factory=software_version)
    public_key: str = Field(default="", description="the signer's RSA public key (OpenSSH format)")
    signature: str = Field(default="", description="base64 RSA-PSS signature of canonical_bytes()")

    def canonical_bytes(self) -> bytes:
        """What is signed: the manifest without its signature, as sorted, compact JSON."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class Identity:
    """The coordinator's RSA key: signs manifests the way hivemind's ``RSAPrivateKey`` signs records."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    @property
    def public_key(self) -> str:
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return raw.decode()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._key.sign(data, _PADDING, hashes.SHA256())).decode()

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Read the PEM key at ``path``, or create it (2048-bit RSA, mode 0600, never overwriting)."""
        path = Path(path)
        if not path.exists():
            _create_key(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ManifestError(f"cannot read the identity key {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ManifestError(f"identity key {path} is not an RSA private key")
        if path.stat().st_mode & 0o077:
            logger.warning("identity key %s is readable by others; chmod 600 it", path)
        return cls(key)


def _create_key(path: Path) -> None:
    """Write a new key through a 0600 temp file, then link it into place (a concurrent writer wins)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            logger.info("created the coordinator identity key %s", path)
    finally:
        tmp.unlink(missing_ok=True)


def sign_manifest(manifest: Manifest, identity: Identity) -> Manifest:
    """``manifest`` with the signer's public key and the signature filled in."""
    unsigned = manifest.model_copy(update={"public_key": identity.public_key, "signature": ""})
    return unsigned.model_copy(update={"signature": identity.sign(unsigned.canonical_bytes())})


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative POSIX paths) except the manifest."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_FILE
    }


def read_manifest(directory: Path) -> Manifest:
    """Parse ``directory/manifest.json`` (no checks beyond its schema)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{directory} has no {MANIFEST_FILE}") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("manifest_version") != MANIFEST_VERSION:
        version = raw.get("manifest_version") if isinstance(raw, dict) else None
        raise ManifestError(
            f"{path}: unsupported manifest_version {version!r} (this cogen reads {MANIFEST_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise ManifestError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def verify_manifest(directory: Path, trusted_key: str | None = None) -> Manifest:
    """Check the signature (by ``trusted_key``, if given) and every file's sha256; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest.signature or not manifest.public_key:
        raise ManifestError(f"{directory / MANIFEST_FILE} is not signed")
    if trusted_key is not None and manifest.public_key.strip() != trusted_key.strip():
        raise ManifestError(f"{directory / MANIFEST_FILE} is signed by an untrusted key")
    try:
        public = RSAPublicKey.from_bytes(manifest.public_key.encode())
    except ValueError as e:
        raise ManifestError(f"{directory / MANIFEST_FILE}: bad public key: {e}") from None
    if not public.verify(manifest.canonical_bytes(), manifest.signature.encode()):
        raise ManifestError(f"{directory / MANIFEST_FILE}: the signature does not match its contents")
    actual = file_hashes(directory)
    for name, digest in manifest.files.items():
        if name not in actual:
            raise ManifestError(f"{directory / name} is listed in the manifest but missing")
        if actual[name] != digest:
            raise ManifestError(f"{directory / name} does not match its sha256 in the manifest")
    unlisted = sorted(set(actual) - set(manifest.files))
    if unlisted:
        raise ManifestError(f"{directory / unlisted[0]} is not listed in the manifest")
    return manifest
