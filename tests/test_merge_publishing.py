"""Merging experts and publishing the result: the base plus the merged delta, the evaluation and the
routed mixture in the signed manifest, atomic generations, refused experts, the CLI, tied embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merging_helpers import CPU, cfg, make_expert, two_experts

from cogen.coordinator.merging import MergeError, registry, verify_manifest
from cogen.coordinator.merging.experts import iter_deltas, load_experts
from cogen.coordinator.merging.merge import merge_experts
from cogen.coordinator.merging.publish import generation_dir
from cogen.core import models
from cogen.core.checkpoint import load_adapter


@pytest.fixture(scope="module")
def experts(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return two_experts(tiny_path, tmp_path_factory.mktemp("experts"))


def test_published_base_loads_and_equals_base_plus_merged_delta(
    tmp_path: Path, tiny_path: str, experts: list[Path]
) -> None:
    from transformers import AutoModelForCausalLM

    final = merge_experts(cfg(tmp_path, experts, method="ties", density=0.4, weights=(1.0, 2.0)))
    assert final == generation_dir(tmp_path / "out", 1) and (tmp_path / "out/latest").resolve() == final
    manifest = verify_manifest(final)
    assert manifest.method == "ties" and manifest.parent.model == "tiny" and manifest.parent.generation == 0
    assert [(e.name, e.weight) for e in manifest.experts] == [("medical", 1.0), ("legal", 2.0)]
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    base = models.load_base(tiny_path, "fp32", CPU)
    ties = registry.create("ties", registry.MergeParams(density=0.4))
    for module, deltas in iter_deltas(load_experts(experts)):
        expected = base.get_parameter(f"{module}.weight") + ties.merge(
            module, deltas[0], deltas, torch.tensor([1.0, 2.0])
        )
        assert torch.allclose(merged.get_parameter(f"{module}.weight"), expected, atol=1e-6), module
    untouched = "model.layers.0.self_attn.k_proj.weight"  # not adapted by the experts
    assert torch.equal(merged.get_parameter(untouched), base.get_parameter(untouched))
    # a second merge of the same base becomes the next generation
    again = merge_experts(cfg(tmp_path, experts, method="linear", weights=(1.0, 0.0)))
    assert again == generation_dir(tmp_path / "out", 2) and verify_manifest(again).experts[1].weight == 0.0
    # merging into a published generation records it as the parent
    child = verify_manifest(merge_experts(cfg(tmp_path, experts, method="linear", model=str(final))))
    assert child.generation == 3 and child.parent.generation == 1 and child.parent.manifest_sha256


def test_evaluation_goes_into_the_manifest(tmp_path: Path, experts: list[Path]) -> None:
    final = merge_experts(
        cfg(tmp_path, experts, method="dare", weights=(1.0, 1.0), eval_domains=("medical",), eval_blocks=2,
            gate=False, eval_block_size=32)
    )  # fmt: skip
    evaluation = verify_manifest(final).evaluation
    assert evaluation is not None and evaluation.merged is not None
    assert set(evaluation.experts) == {"medical", "legal"} and evaluation.tokens_per_domain == {"medical": 64}
    assert sorted(verify_manifest(final).ranking["medical"]) == ["legal", "medical"]


@pytest.mark.parametrize("routing", ["sequence", "arrow"])
def test_the_routed_mixture_is_published_beside_the_dense_base(
    tmp_path: Path, experts: list[Path], tiny_path: str, routing: str
) -> None:
    from cogen.coordinator.merging.evaluate import domain_blocks, losses
    from cogen.coordinator.merging.merge import MIXTURE_DIR, load_base_fp32
    from cogen.coordinator.merging.moe import load_mixture
    from cogen.core import models

    final = merge_experts(
        cfg(tmp_path, experts, method="ties", eval_domains=("medical", "legal"), eval_blocks=2, gate=False,
            eval_block_size=32, router_blocks=4, weights=(1.0, 1.0), mixture_routing=routing)
    )  # fmt: skip
    manifest = verify_manifest(final)  # the mixture's files are hashed and signed with the rest
    spec = json.loads((final / MIXTURE_DIR / "mixture.json").read_text())
    assert spec["routing"] == routing and (f"{MIXTURE_DIR}/router.safetensors" in manifest.files) == (
        routing == "sequence"
    )
    assert (manifest.best.routing_accuracy is None) == (routing == "arrow")  # type: ignore[union-attr]
    assert manifest.best is not None and manifest.best.kind in ("moe", "dense")
    assert manifest.best.dense_losses == manifest.evaluation.merged  # type: ignore[union-attr]
    assert any(name.startswith(f"{MIXTURE_DIR}/") for name in manifest.files)
    # the published mixture loads on the parent base and scores what the manifest says
    base = load_base_fp32(tiny_path, torch.device("cpu"))
    mixture = load_mixture(base, final / MIXTURE_DIR)
    blocks = domain_blocks(("medical", "legal"), models.load_tokenizer(tiny_path), 32, 2)
    assert losses(mixture, blocks) == pytest.approx(manifest.best.losses, abs=1e-4)


class _FailsMidway(registry.MergeMethod):
    name = "test-fails-midway"
    calls = 0

    def merge(
        self, module: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        type(self).calls += 1
        if type(self).calls > 2:
            raise RuntimeError("crash in the middle of the merge")
        return deltas[0]


def test_a_failed_merge_leaves_latest_on_the_previous_generation(
    tmp_path: Path, experts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = merge_experts(cfg(tmp_path, experts, method="linear"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the test's method goes with it
    registry.register(_FailsMidway.name, _FailsMidway)
    with pytest.raises(RuntimeError, match="crash in the middle"):
        merge_experts(cfg(tmp_path, experts, method=_FailsMidway.name))
    with pytest.raises(MergeError, match="already published"):
        merge_experts(cfg(tmp_path, experts, method="linear", generation=1))
    assert (tmp_path / "out/latest").resolve() == first
    assert sorted(p.name for p in (tmp_path / "out/generations").iterdir()) == ["gen-000001"]
    verify_manifest(first)


def test_incompatible_experts_are_refused(tmp_path: Path, tiny_path: str, experts: list[Path]) -> None:
    other_base = make_expert(tiny_path, tmp_path / "other", 3, base_model="smollm2-135m")
    with pytest.raises(MergeError, match="different base models"):
        load_experts([experts[0], other_base])
    other_modules = make_expert(tiny_path, tmp_path / "mods", 4, targets=("q_proj",))
    with pytest.raises(MergeError, match="adapt different modules"):
        load_experts([experts[0], other_modules])
    with pytest.raises(MergeError, match="does not exist"):
        load_experts([tmp_path / "nowhere"])


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COGEN_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "cogen.coordinator.cli", "merge", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_merges_end_to_end_and_names_the_known_methods(tmp_path: Path, experts: list[Path]) -> None:
    common = ["--experts", *map(str, experts), "--identity", "id.pem", "--out", "merged"]
    done = _cli(tmp_path, *common, "--method", "dare_ties", "--density", "0.2", "--seed", "0")
    assert done.returncode == 0, done.stderr
    assert "published generation 1" in done.stdout
    verify_manifest(tmp_path / "merged/latest")
    bad = _cli(tmp_path, *common, "--method", "nope")
    lines = [line for line in bad.stderr.splitlines() if "nope" in line]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].endswith("unknown merge method 'nope'; known: dare, dare_ties, linear, ties")


def test_a_merged_tied_output_projection_is_the_adapter_not_the_input_embeddings(
    tmp_path: Path, tiny_path: str
) -> None:
    """The tiny model ties lm_head to its input embeddings: the merge unties it, so the published base
    computes what base + adapter computes (adding the delta to the shared tensor would not)."""
    from transformers import AutoModelForCausalLM

    targets = ("q_proj", "v_proj", "lm_head")
    expert = make_expert(tiny_path, tmp_path / "medical", 5, expert="medical", targets=targets, std=0.2)
    final = merge_experts(cfg(tmp_path, [expert], method="linear", weights=(1.0,)))
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False
    base = models.load_base(tiny_path, "fp32", CPU)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    tokens = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_adapter(base, load_experts([expert])[0].path).eval()(input_ids=tokens).logits
        dense = merged.eval()(input_ids=tokens).logits
    assert torch.allclose(dense, adapted, atol=1e-4), (dense - adapted).abs().max()
    # the input embeddings are the base's own: only the output projection moved
    fresh = models.load_base(tiny_path, "fp32", CPU)
    assert torch.equal(merged.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight, fresh.get_output_embeddings().weight)
