"""A node fetches a published base over HTTP by hash and refuses anything its signature does not cover."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time
from merging_helpers import make_expert, merge_config

from cogen.coordinator.merging import Identity, merge_experts
from cogen.node.follow import MirrorServer, fetch_base
from cogen.protocols import CheckpointSource
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE, ManifestError

PEER = "12D3KooWSb9uUfn3yQrD2xTJmUFr4PbYBb7oYbP2pCSs3rGqCwTq"


@pytest.fixture(scope="module")
def served(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A published generation under a served root, and the public key that signed it."""
    root = tmp_path_factory.mktemp("served")
    experts = (make_expert(tiny_path, root / "a", 1), make_expert(tiny_path, root / "b", 2, expert="code"))
    cfg = merge_config(experts=experts, method="ties", out=root / "out", identity=root / "id.pem")
    final = merge_experts(cfg)
    return final, Identity.load_or_create(root / "id.pem").public_key


def _source(directory: Path, mirror: MirrorServer, generation: int = 1) -> CheckpointSource:
    return CheckpointSource(
        peer_id=PEER, generation=generation, manifest_sha256=sha256_file(directory / MANIFEST_FILE),
        url=f"{mirror.url}{directory.relative_to(mirror.root).as_posix()}/", time=get_dht_time(),
    )  # fmt: skip


@pytest.fixture
def mirror(served: tuple[Path, str], tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "mirror"
    shutil.copytree(served[0], root / "gen")
    server = MirrorServer(root, "127.0.0.1")
    server.start()
    yield server
    server.stop()


def test_fetches_and_verifies_every_file(
    served: tuple[Path, str], mirror: MirrorServer, tmp_path: Path
) -> None:
    published, key = served
    base = fetch_base(_source(mirror.root / "gen", mirror), tmp_path / "bases", key)
    assert base.generation == 1
    for p in published.iterdir():
        assert sha256_file(base.path / p.name) == sha256_file(p)
    again = fetch_base(_source(mirror.root / "gen", mirror), tmp_path / "bases", key)  # reuses its copy
    assert again.path == base.path


def test_refuses_a_tampered_weight_file(
    served: tuple[Path, str], mirror: MirrorServer, tmp_path: Path
) -> None:
    weights = mirror.root / "gen" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.safetensors does not match its sha256"):
        fetch_base(_source(mirror.root / "gen", mirror), tmp_path / "bases", served[1])
    assert not list((tmp_path / "bases").iterdir())  # nothing half-fetched is left behind


def test_refuses_a_manifest_not_signed_by_the_trusted_key(
    served: tuple[Path, str], mirror: MirrorServer, tmp_path: Path
) -> None:
    other = Identity.load_or_create(tmp_path / "other.pem").public_key
    with pytest.raises(ManifestError, match="untrusted key"):
        fetch_base(_source(mirror.root / "gen", mirror), tmp_path / "bases", other)


def test_refuses_an_edited_manifest(served: tuple[Path, str], mirror: MirrorServer, tmp_path: Path) -> None:
    manifest = mirror.root / "gen" / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"method": "ties"', '"method": "linear"'))
    with pytest.raises(ManifestError, match="signature does not match"):
        fetch_base(_source(mirror.root / "gen", mirror), tmp_path / "bases", served[1])


def test_refuses_a_manifest_other_than_announced(
    served: tuple[Path, str], mirror: MirrorServer, tmp_path: Path
) -> None:
    source = _source(mirror.root / "gen", mirror).model_copy(update={"manifest_sha256": "0" * 64})
    with pytest.raises(ManifestError, match="announced sha256"):
        fetch_base(source, tmp_path / "bases", served[1])
    wrong_generation = _source(mirror.root / "gen", mirror, generation=2)
    with pytest.raises(ManifestError, match="announced as 2"):
        fetch_base(wrong_generation, tmp_path / "bases", served[1])
