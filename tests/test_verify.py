"""``cogen verify --recompute``: a published generation's merge re-run from its manifest and compared."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from merging_helpers import make_expert, merge_config
from safetensors.torch import load_file, save_file

from cogen.coordinator.merging import Identity, merge_experts
from cogen.coordinator.merging.manifest import sign_manifest
from cogen.coordinator.merging.recompute import RecomputeError, recompute
from cogen.coordinator.merging.reproduce import TOLERANCE
from cogen.protocols.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    file_hashes,
    file_sizes,
    read_manifest,
)

ADAPTED = "model.layers.0.self_attn.q_proj.weight"  # a module the experts adapt


@pytest.fixture(scope="module")
def setup(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("verify")
    experts = [
        make_expert(tiny_path, root / "medical", 1, expert="medical"),
        make_expert(tiny_path, root / "legal", 2, expert="legal"),
    ]
    cfg = merge_config(
        experts=experts, out=root / "out", identity=root / "id.pem", device="cpu", method="dare_ties",
        density=0.6, seed=3, weights=(1.0, 2.0),
    )  # fmt: skip
    return merge_experts(cfg), experts, root / "id.pem"


def resign(gen_dir: Path, identity: Path, **changes: object) -> None:
    """Rewrite ``gen_dir``'s manifest with ``changes``, its files re-hashed, signed by ``identity``:
    what a coordinator that lies about its merge would publish."""
    manifest = read_manifest(gen_dir).model_copy(update=changes)
    manifest = manifest.model_copy(update={"files": file_hashes(gen_dir), "sizes": file_sizes(gen_dir)})
    signed: Manifest = sign_manifest(manifest, Identity.load_or_create(identity))
    (gen_dir / MANIFEST_FILE).write_text(json.dumps(signed.model_dump(mode="json")))


@pytest.fixture
def copy(setup: tuple[Path, list[Path], Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(setup[0], tmp_path / "gen"))


def test_a_published_generation_recomputes_bit_identically(setup: tuple[Path, list[Path], Path]) -> None:
    gen_dir, experts, _ = setup
    found = recompute(gen_dir, list(reversed(experts)))  # matched by hash, merged in the manifest's order
    assert found.problems == [] and found.exact and found.tensors > 10
    run = subprocess.run(
        [sys.executable, "-m", "cogen.app.cli", "verify", str(gen_dir), "--recompute", "--experts",
         *map(str, experts)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"{found.tensors} tensors bit-identical" in run.stdout


def test_another_expert_checkpoint_is_named_with_the_tensor_it_changes(
    setup: tuple[Path, list[Path], Path], tiny_path: str, tmp_path: Path
) -> None:
    gen_dir, experts, _ = setup
    other = make_expert(tiny_path, tmp_path / "legal-other", 7, expert="legal")
    found = recompute(gen_dir, [experts[0], other])
    assert (
        "expert legal" in found.problems[0] and "not the checkpoint the manifest names" in found.problems[0]
    )
    assert "layers.0" in found.problems[-1] and "differs" in found.problems[-1] and not found.exact
    run = subprocess.run(
        [sys.executable, "-m", "cogen.app.cli", "verify", str(gen_dir), "--recompute", "--experts",
         str(experts[0]), str(other)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 6 and "differs" in run.stderr.splitlines()[-1]


def test_a_weight_the_manifest_misstates_is_caught(setup: tuple[Path, list[Path], Path], copy: Path) -> None:
    _, experts, identity = setup
    manifest = read_manifest(copy)
    lie = [manifest.experts[0], manifest.experts[1].model_copy(update={"weight": 1.5})]
    resign(copy, identity, experts=lie)  # signed, files intact: only the arithmetic is wrong
    found = recompute(copy, experts)
    assert (
        len(found.problems) == 1
        and found.problems[0].startswith("model.layers.0.")
        and "differs" in found.problems[0]
    )
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    raw["experts"][1]["weight"] = 2.0  # the true weight back, without signing it
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="signature"):  # an unsigned edit is caught before any arithmetic
        recompute(copy, experts)


def test_elsewhere_a_deviation_within_the_tolerance_passes_and_here_it_does_not(
    setup: tuple[Path, list[Path], Path], copy: Path
) -> None:
    _, experts, identity = setup
    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors[ADAPTED] = tensors[ADAPTED] * (1 + TOLERANCE / 4)  # a rounding-sized difference
    save_file(tensors, str(weights), metadata={"format": "pt"})
    resign(copy, identity)  # same platform: bit-identical is expected
    problems = recompute(copy, experts).problems
    assert len(problems) == 1 and ADAPTED in problems[0] and "bit-identical expected" in problems[0]
    reproduction = read_manifest(copy).reproduction
    assert reproduction is not None
    resign(copy, identity, reproduction=reproduction.model_copy(update={"platform": "torch 9; cuda X"}))
    found = recompute(copy, experts)
    assert found.problems == [] and not found.exact and 0 < found.max_deviation <= TOLERANCE
    tensors[ADAPTED] = tensors[ADAPTED] * (1 + 100 * TOLERANCE)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    resign(copy, identity, reproduction=reproduction.model_copy(update={"platform": "torch 9; cuda X"}))
    assert ADAPTED in recompute(copy, experts).problems[0]


def test_refusals_are_one_line(setup: tuple[Path, list[Path], Path], copy: Path, tmp_path: Path) -> None:
    _, experts, identity = setup
    with pytest.raises(RecomputeError, match="no checkpoint given for expert legal"):
        recompute(copy, experts[:1])
    (tmp_path / "parent").mkdir()
    shutil.copy(Path(copy) / "config.json", tmp_path / "parent" / "config.json")
    with pytest.raises(RecomputeError, match="give the parent with --parent DIR"):
        recompute(copy, experts, parent=tmp_path / "parent")
    resign(copy, identity, manifest_version=2, reproduction=None)
    with pytest.raises(RecomputeError, match="version 2 manifest: it does not say how"):
        recompute(copy, experts)
