"""Merging experts: the method registry, PEFT parity, weights from a ranking, publishing, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merging_helpers import CPU, make_expert, merge_config
from peft.utils import merge_utils

from cogen.coordinator.config import MergeConfig
from cogen.coordinator.merging import EvalMatrix, MergeError, ranking_weights, registry, verify_manifest
from cogen.coordinator.merging.dare import module_seed
from cogen.coordinator.merging.experts import dense_delta, iter_deltas, load_experts
from cogen.coordinator.merging.merge import merge_experts
from cogen.coordinator.merging.publish import generation_dir
from cogen.coordinator.merging.weights import ranking
from cogen.core import models
from cogen.core.checkpoint import load_adapter


@pytest.fixture(scope="module")
def experts(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    return [
        make_expert(tiny_path, root / "medical", 1, expert="medical"),
        make_expert(tiny_path, root / "legal", 2, expert="legal"),
    ]


def first_module(paths: list[Path]) -> tuple[str, list[torch.Tensor]]:
    return next(iter_deltas(load_experts(paths)))


def cfg(tmp_path: Path, experts: list[Path], **kw: object) -> MergeConfig:
    settings = {"experts": experts, "out": tmp_path / "out", "identity": tmp_path / "id.pem", "device": "cpu"}
    return merge_config(**{**settings, **kw})


def test_registry_names_and_errors() -> None:
    assert registry.known() == ["dare", "dare_ties", "linear", "ties"]
    with pytest.raises(ValueError, match=r"^unknown merge method 'x'; known: dare, dare_ties, linear, ties$"):
        registry.get("x")
    with pytest.raises(MergeError, match="already registered"):
        registry.register("ties", registry.get("linear"))
    with pytest.raises(MergeError, match="density"):
        registry.create("ties", registry.MergeParams(density=0.0))


def test_dense_delta_equals_peft_delta_weight(tiny_path: str, experts: list[Path]) -> None:
    expert = load_experts(experts[:1])[0]
    peft_model = load_adapter(models.load_base(tiny_path, "fp32", CPU), expert.path)
    layer = peft_model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    from safetensors import safe_open

    with safe_open(str(expert.path / "adapter_model.safetensors"), framework="pt") as handle:
        ours = dense_delta(handle, expert, "model.layers.1.self_attn.v_proj")
    assert torch.allclose(ours, layer.get_delta_weight("default"), atol=1e-7)


def test_linear_selects_and_averages(experts: list[Path]) -> None:
    module, (d1, d2) = first_module(experts)
    linear = registry.create("linear")
    assert torch.equal(linear.merge(module, d1, [d1, d2], torch.tensor([1.0, 0.0])), d1)
    assert torch.allclose(linear.merge(module, d1, [d1, d2], torch.tensor([3.0, 3.0])), (d1 + d2) / 2)


def mergekit_disjoint(deltas: torch.Tensor, weights: list[float], method: str) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification (consensus ``sum`` / ``count``,
    normalised by the agreeing weights), written out independently as the reference."""
    w = torch.tensor(weights, dtype=deltas.dtype)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    weighted = deltas * w
    sign = weighted.sign()
    votes = weighted.sum(dim=0) if method == "total" else sign.sum(dim=0)
    mask = sign == (votes >= 0).to(deltas.dtype) * 2 - 1
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return (weighted * mask).sum(dim=0) / divisor


def test_ties_and_dare_match_peft_with_equal_weights_and_dare_is_seeded(experts: list[Path]) -> None:
    module, deltas = first_module(experts)
    ones = torch.ones(2)
    params = registry.MergeParams(density=0.3, seed=7)
    ties = registry.create("ties", params).merge(module, deltas[0], deltas, ones)
    assert torch.allclose(ties, merge_utils.ties(deltas, ones, 0.3), rtol=0, atol=1e-9)
    for name, peft_fn, scaled in [
        ("dare", merge_utils.dare_linear, ones / 2),
        ("dare_ties", merge_utils.dare_ties, ones),
    ]:
        ours = registry.create(name, params).merge(module, deltas[0], deltas, ones)
        with torch.random.fork_rng():
            torch.manual_seed(module_seed(7, module))
            assert torch.allclose(ours, peft_fn(deltas, scaled, 0.3), rtol=0, atol=1e-9)
        torch.manual_seed(123)  # the global generator's state does not matter
        assert torch.equal(ours, registry.create(name, params).merge(module, deltas[0], deltas, ones))
        other = registry.create(name, registry.MergeParams(density=0.3, seed=8))
        assert not torch.equal(ours, other.merge(module, deltas[0], deltas, ones))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [3.0, 1.0, 1.0], [0.6, 0.3, 0.1]])
@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_weighted_ties_and_dare_ties_are_mergekits_and_stay_convex(
    weights: list[float], majority_sign: str
) -> None:
    from cogen.coordinator.merging.ties import trim

    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(256, 128, generator=generator) * 0.01 for _ in weights]
    w = torch.tensor(weights)
    params = registry.MergeParams(density=0.5, seed=5, majority_sign=majority_sign)  # type: ignore[arg-type]
    trimmed = torch.stack([trim(d, 0.5) for d in deltas])
    ties = registry.create("ties", params).merge("m", deltas[0], deltas, w)
    assert torch.allclose(ties, mergekit_disjoint(trimmed, weights, majority_sign), rtol=1e-6, atol=1e-9)
    assert bool(
        (ties.abs() <= trimmed.abs().amax(dim=0) * (1 + 1e-6)).all()
    )  # never beyond what an expert has
    dare_ties = registry.create("dare_ties", params).merge("m", deltas[0], deltas, w)
    with torch.random.fork_rng():
        torch.manual_seed(module_seed(5, "m"))
        dropped = torch.stack([merge_utils.prune(d, 0.5, method="random", rescale=True) for d in deltas])
    assert torch.allclose(dare_ties, mergekit_disjoint(dropped, weights, majority_sign), rtol=1e-6, atol=1e-9)
    assert bool((dare_ties.abs() <= dropped.abs().amax(dim=0) * (1 + 1e-6)).all())


def test_ties_on_hand_made_tensors() -> None:
    ties = registry.create("ties", registry.MergeParams(density=0.5))
    a = torch.tensor([[4.0, -1.0], [0.5, -3.0]])  # trim keeps 4 and -3
    b = torch.tensor([[2.0, 2.0], [-6.0, 0.1]])  # trim keeps -6 and both 2s (a tie at the threshold)
    c = torch.tensor([[-1.0, 0.2], [0.3, -5.0]])  # trim keeps -1 and -5
    # kept: a {4, -3}, b {2, 2, -6}, c {-1, -5}; elected signs ("total"): + , + , - , -
    merged = ties.merge("m", a, [a, b, c], torch.ones(3))
    expected = torch.tensor([[(4.0 + 2.0) / 2, 2.0], [-6.0, (-3.0 - 5.0) / 2]])
    assert torch.equal(merged, expected)
    # weights enter the vote and the mean of the agreeing values, divided by *their* weight sum
    weighted = ties.merge("m", a, [a, b], torch.tensor([3.0, 1.0]))
    assert torch.allclose(weighted, torch.tensor([[(12.0 + 2.0) / 4, 2.0], [-6.0, -3.0]]))


def test_dare_rescaling_preserves_the_expectation() -> None:
    dare = registry.create("dare", registry.MergeParams(density=0.25, seed=7))
    delta = torch.full((400, 400), 2.0)
    merged = dare.merge("m", delta, [delta], torch.ones(1))
    kept = merged != 0
    assert torch.equal(merged[kept], torch.full_like(merged[kept], 8.0))  # survivors scaled by 1/density
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert abs(merged.mean().item() - 2.0) < 0.05  # in expectation, the delta is unchanged


def test_ranking_weights_leave_out_an_expert_worse_everywhere() -> None:
    matrix = EvalMatrix(
        domains=["medical", "legal"],
        tokens_per_domain={"medical": 64, "legal": 64},
        base={"medical": 4.0, "legal": 5.0},
        experts={
            "medical": {"medical": 3.0, "legal": 5.5},  # better on its domain, worse elsewhere
            "legal": {"medical": 4.2, "legal": 4.0},
            "broken": {"medical": 4.5, "legal": None},  # worse / not finite everywhere
        },
    )
    weights = ranking_weights(matrix)
    assert weights == {"medical": pytest.approx(0.25), "legal": pytest.approx(0.2), "broken": 0.0}
    assert ranking(matrix) == {
        "medical": ["medical", "legal", "broken"],
        "legal": ["legal", "medical", "broken"],
    }


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
