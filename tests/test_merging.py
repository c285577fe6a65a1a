"""Merging experts: the method registry, PEFT parity, TIES and DARE, weights from a ranking (publishing
and the CLI: ``test_merge_publishing.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merging_helpers import CPU, two_experts
from peft.utils import merge_utils

from cogen.coordinator.merging import EvalMatrix, MergeError, ranking_weights, registry
from cogen.coordinator.merging.dare import module_seed
from cogen.coordinator.merging.experts import dense_delta, iter_deltas, load_experts
from cogen.coordinator.merging.weights import ranking
from cogen.core import models
from cogen.core.checkpoint import load_adapter


@pytest.fixture(scope="module")
def experts(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return two_experts(tiny_path, tmp_path_factory.mktemp("experts"))


def first_module(paths: list[Path]) -> tuple[str, list[torch.Tensor]]:
    return next(iter_deltas(load_experts(paths)))


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
