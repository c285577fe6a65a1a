"""The manifest of a published base: its schema, and how anyone checks one.

``manifest.json`` records a generation's lineage (parent base and its hashes, the experts and their
hashes), how it was made (method, parameters, weights), how it scored (evaluation matrix, ranking), the
sha256 and size of every other file in the directory, and an RSA signature over the canonical JSON of
all that (sorted keys, no whitespace, the ``signature`` field left out). The signature scheme is hivemind's
(RSA-PSS over SHA-256, base64), so anyone verifies it with ``hivemind.utils.crypto.RSAPublicKey``.
Signing lives with the coordinator (``cogen.coordinator.merging.manifest``); this module is what a node
needs to trust a checkpoint it fetched: :func:`verify_manifest`.

Versions: 3 also says how exactly the merge can be recomputed (``reproduction``: the platform it ran
on and the tolerance a recomputation elsewhere must meet; ``cogen verify --recompute``); 2 declares every
file's size (``sizes``), so a downloader stops reading at the signed size; 1 (before sizes) is still read
and verified as it was signed (its canonical form has no ``sizes``), and a downloader bounds its files by
a global cap instead (:meth:`Manifest.declared_size` is ``None``). Each older version's canonical form
leaves out the fields it did not have.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

from hivemind.utils.crypto import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator

from cogen.protocols.fusion import FusionReport
from cogen.protocols.gate import GateReport
from cogen.protocols.hashing import sha256_tree
from cogen.protocols.ranking import Agreement, PrequentialRanking, Ranking
from cogen.protocols.version import software_version

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 4
#: versions this cogen reads: 1 has no file sizes (it verifies as signed; downloads use a global cap),
#: 2 no reproduction record, 3 no gate or fusion record
READABLE_VERSIONS = (1, 2, 3, 4)
#: the fields each version's canonical (signed) form leaves out, beyond the signature itself
_NOT_IN_VERSION = {
    1: {"sizes", "reproduction", "gate", "fusion"},
    2: {"reproduction", "gate", "fusion"},
    3: {"gate", "fusion"},
    4: set(),
}


class ManifestError(RuntimeError):
    """A manifest is missing, malformed, unsigned or does not match the files (one line)."""

    exit_code: ClassVar[int] = 6  # ExitCode.DATA (cogen.core.exit_codes)
    what: ClassVar[str] = "manifest"


class EvalMatrix(BaseModel):
    """Validation losses (nats per token) on each domain: the base, every expert, and the merge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domains: list[str]
    tokens_per_domain: dict[str, int] = Field(description="tokens each domain's losses were measured on")
    base: dict[str, float | None] = Field(description="domain -> loss of the base (null: not finite)")
    experts: dict[str, dict[str, float | None]] = Field(description="expert -> domain -> loss")
    merged: dict[str, float | None] | None = Field(default=None, description="domain -> loss of the merge")


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


class BestModel(BaseModel):
    """The best-quality model of a generation, when it is not the dense merge that becomes the base."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(description="dense: the published base itself; moe: the routed mixture of the experts")
    path: str = Field(description="its directory inside the generation ('' for the base itself)")
    losses: dict[str, float | None] = Field(description="domain -> validation loss (the evaluation's blocks)")
    dense_losses: dict[str, float | None] = Field(description="domain -> loss of the dense merge, to compare")
    routing_accuracy: float | None = Field(
        default=None, description="share of validation sequences routed to their own domain's expert"
    )


class Reproduction(BaseModel):
    """How a dense merge can be recomputed: bit-identically on the platform it ran on, elsewhere within
    ``tolerance`` (a matrix product's rounding depends on the BLAS kernel a CPU or GPU picks)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    platform: str = Field(
        max_length=200, description="torch version, device type and CPU capability the merge ran on"
    )
    tolerance: float = Field(
        ge=0, le=1e-2, description="largest |recomputed - published| / max |published| per tensor elsewhere"
    )


class Manifest(BaseModel):
    """The signed record of one published generation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    generation: int = Field(ge=1)
    parent: ParentInfo
    experts: list[ExpertEntry]
    method: str
    params: dict[str, float | int | str] = Field(default_factory=dict)
    weight_source: str = Field(
        description="where the weights came from: flags, prequential, evaluation or equal"
    )
    evaluation: EvalMatrix | None = None
    ranking: dict[str, list[str]] = Field(default_factory=dict, description="domain -> experts, best first")
    best: BestModel | None = Field(
        default=None, description="the best-quality merged model, if it is not the dense merge (moe)"
    )
    rankings: Ranking | None = Field(
        default=None, description="robust overall ranking (Borda, Bradley–Terry, bootstrap) and the cheap one"
    )
    prequential: PrequentialRanking | None = Field(
        default=None, description="the cheap ranking from the nodes' prequential claims, spot-checked"
    )
    agreement: Agreement | None = Field(
        default=None, description="on an audit generation: the cheap order against the full evaluation's"
    )
    files: dict[str, str] = Field(description="every other file in the directory -> sha256")
    sizes: dict[str, NonNegativeInt] = Field(
        default_factory=dict, description="every file in files -> its size in bytes (version 2; empty in 1)"
    )
    gate: GateReport | None = Field(
        default=None, description="the publishing gate's candidates and verdicts (version 4)"
    )
    fusion: FusionReport | None = Field(
        default=None,
        description="method fuse: the teachers distilled into the base, and the cost (version 4)",
    )
    reproduction: Reproduction | None = Field(
        default=None, description="how exactly `cogen verify --recompute` must match (version 3)"
    )
    created_at: float = Field(default_factory=time.time)
    software_version: str = Field(default_factory=software_version)
    public_key: str = Field(default="", description="the signer's RSA public key (OpenSSH format)")
    signature: str = Field(default="", description="base64 RSA-PSS signature of canonical_bytes()")

    @model_validator(mode="after")
    def _sizes_match_files(self) -> Manifest:
        if self.manifest_version not in READABLE_VERSIONS:
            raise ValueError(
                f"manifest_version {self.manifest_version} is not one this cogen writes or reads"
            )
        if self.manifest_version >= 2 and set(self.sizes) != set(self.files):
            raise ValueError("sizes must list exactly the files of the manifest")
        if self.manifest_version < 2 and self.sizes:
            raise ValueError(f"a version {self.manifest_version} manifest declares no sizes")
        if self.manifest_version < 3 and self.reproduction is not None:
            raise ValueError(f"a version {self.manifest_version} manifest has no reproduction record")
        if self.manifest_version < 4 and (self.gate is not None or self.fusion is not None):
            raise ValueError(f"a version {self.manifest_version} manifest has no gate or fusion record")
        return self

    def declared_size(self, name: str) -> int | None:
        """The signed size of file ``name`` in bytes; ``None`` for a manifest older than sizes."""
        return self.sizes[name] if self.manifest_version >= 2 else None

    def canonical_bytes(self) -> bytes:
        """What is signed: the manifest without its signature, as sorted, compact JSON (an older
        manifest was signed before later fields existed, so its canonical form leaves them out)."""
        exclude = {"signature", *_NOT_IN_VERSION[self.manifest_version]}
        data = self.model_dump(mode="json", exclude=exclude)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative POSIX paths) except the manifest."""
    return sha256_tree(directory, exclude={MANIFEST_FILE})


def file_sizes(directory: Path) -> dict[str, int]:
    """Size in bytes of every file under ``directory`` (relative POSIX paths) except the manifest."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
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
    version = raw.get("manifest_version") if isinstance(raw, dict) else None
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise ManifestError(f"{path}: unsupported manifest_version {version!r} (this cogen reads {readable})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise ManifestError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def check_signature(manifest: Manifest, trusted_key: str | None, where: str) -> None:
    """Raise :class:`ManifestError` unless ``manifest`` is signed (by ``trusted_key``, if given)."""
    if not manifest.signature or not manifest.public_key:
        raise ManifestError(f"{where} is not signed")
    if trusted_key is not None and manifest.public_key.strip() != trusted_key.strip():
        raise ManifestError(f"{where} is signed by an untrusted key")
    try:
        public = RSAPublicKey.from_bytes(manifest.public_key.encode())
    except ValueError as e:
        raise ManifestError(f"{where}: bad public key: {e}") from None
    if not public.verify(manifest.canonical_bytes(), manifest.signature.encode()):
        raise ManifestError(f"{where}: the signature does not match its contents")


def verify_manifest(directory: Path, trusted_key: str | None = None) -> Manifest:
    """Check the signature (by ``trusted_key``, if given), every file's size (from version 2) and
    sha256; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_signature(manifest, trusted_key, str(directory / MANIFEST_FILE))
    on_disk = file_sizes(directory)
    for name in manifest.files:
        if name not in on_disk:
            raise ManifestError(f"{directory / name} is listed in the manifest but missing")
        declared = manifest.declared_size(name)
        if declared is not None and on_disk[name] != declared:
            raise ManifestError(
                f"{directory / name} has {on_disk[name]} bytes; the manifest declares {declared}"
            )
    unlisted = sorted(set(on_disk) - set(manifest.files))
    if unlisted:
        raise ManifestError(f"{directory / unlisted[0]} is not listed in the manifest")
    actual = file_hashes(directory)
    for name, digest in manifest.files.items():
        if actual[name] != digest:
            raise ManifestError(f"{directory / name} does not match its sha256 in the manifest")
    return manifest


def owner_statement(swarm: str, owner: bytes) -> bytes:
    """What the manifest key signs to name the DHT key (a record owner, which changes on every restart
    of the coordinator) that speaks for it in ``swarm``: the ``owner_signature`` of a SwarmInfo record."""
    return b"cogen swarm owner\0" + swarm.encode() + b"\0" + owner


def signs_owner(manifest_key: str, signature: str | None, swarm: str, owner: bytes) -> bool:
    """Whether ``signature`` is ``manifest_key``'s over :func:`owner_statement` (a malformed key or
    signature is simply False: this reads what peers announce)."""
    if not signature:
        return False
    try:
        public = RSAPublicKey.from_bytes(manifest_key.encode())
        return bool(public.verify(owner_statement(swarm, owner), signature.encode()))
    except (ValueError, TypeError):
        return False


def parse_public_key(text: str) -> str:
    """``text`` stripped, if it is an RSA public key in OpenSSH form (what signs manifests); else
    :class:`ValueError` in one line."""
    key = text.strip()
    if not key.startswith("ssh-rsa "):
        raise ValueError("not an OpenSSH RSA public key (ssh-rsa AAAA...)")
    try:
        RSAPublicKey.from_bytes(key.encode())
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a valid RSA public key: {str(e).splitlines()[0] if str(e) else e}") from None
    return key
