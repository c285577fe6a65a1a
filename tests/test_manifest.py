"""The signed manifest of a published base: identity keys, signatures, file hashes, tampering."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from hivemind.utils.crypto import RSAPublicKey
from merging_helpers import make_expert, merge_config

from cogen.coordinator.merging import Identity, ManifestError, merge_experts, verify_manifest
from cogen.protocols.manifest import MANIFEST_FILE, read_manifest


@pytest.fixture(scope="module")
def published(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("published")
    experts = (make_expert(tiny_path, root / "a", 1), make_expert(tiny_path, root / "b", 2, expert="code"))
    cfg = merge_config(
        experts=experts, method="linear", out=root / "out", identity=root / "id.pem", device="cpu"
    )
    return merge_experts(cfg)


@pytest.fixture
def copy(published: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(published, tmp_path / "gen"))


def test_identity_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "id.pem"
    identity = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).public_key == identity.public_key
    signature = identity.sign(b"payload")
    public = RSAPublicKey.from_bytes(identity.public_key.encode())  # hivemind verifies cogen's signatures
    assert public.verify(b"payload", signature.encode()) and not public.verify(b"other", signature.encode())
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ManifestError, match="cannot read the identity key"):
        Identity.load_or_create(tmp_path / "junk.pem")


def test_published_manifest_verifies(published: Path) -> None:
    manifest = verify_manifest(published, trusted_key=read_manifest(published).public_key)
    assert (
        manifest.generation == 1 and "model.safetensors" in manifest.files and "config.json" in manifest.files
    )
    assert manifest.experts[0].sha256 and manifest.parent.files  # the tiny base is local: hashed


def test_a_tampered_file_fails(copy: Path) -> None:
    config = copy / "config.json"
    config.write_text(config.read_text().replace("64", "65", 1))
    with pytest.raises(ManifestError, match=r"config.json does not match its sha256"):
        verify_manifest(copy)


def test_a_missing_or_extra_file_fails(copy: Path) -> None:
    (copy / "extra.py").write_text("print('hi')")
    with pytest.raises(ManifestError, match=r"extra\.py is not listed"):
        verify_manifest(copy)
    (copy / "extra.py").unlink()
    (copy / "generation_config.json").unlink()
    with pytest.raises(ManifestError, match=r"generation_config\.json is listed in the manifest but missing"):
        verify_manifest(copy)


def test_a_changed_field_breaks_the_signature(copy: Path) -> None:
    path = copy / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["experts"][0]["weight"] = 5.0
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="the signature does not match its contents"):
        verify_manifest(copy)


def test_another_key_is_not_trusted(copy: Path, tmp_path: Path) -> None:
    stranger = Identity.load_or_create(tmp_path / "stranger.pem")
    with pytest.raises(ManifestError, match="untrusted key"):
        verify_manifest(copy, trusted_key=stranger.public_key)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    del data["signature"]
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="is not signed"):
        verify_manifest(copy)


def test_every_file_size_is_signed_and_checked(copy: Path) -> None:
    manifest = verify_manifest(copy)
    assert manifest.sizes == {name: (copy / name).stat().st_size for name in manifest.files}
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")  # still valid JSON, one byte longer
    with pytest.raises(ManifestError, match=rf"config\.json has {manifest.sizes['config.json'] + 1} bytes"):
        verify_manifest(copy)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    del data["sizes"]  # a version 2 manifest must declare them
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="sizes must list exactly the files"):
        read_manifest(copy)
    data["manifest_version"] = 5
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    unsupported = r"unsupported manifest_version 5 \(this cogen reads 1, 2, 3, 4\)"
    with pytest.raises(ManifestError, match=unsupported):
        read_manifest(copy)
