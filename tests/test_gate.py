"""The publishing gate's rule: worse than the parent beyond the bootstrap noise, or not."""

import math

import numpy as np
import pytest

from cogen.coordinator.merging.gate import judge


def _blocks(seed: int, n: int = 40, mean: float = 3.0, spread: float = 0.3) -> list[float]:
    return list(np.random.default_rng(seed).normal(mean, spread, n))


def test_a_candidate_clearly_worse_on_one_domain_fails_the_gate_and_names_it():
    parent = {"code": _blocks(0), "legal": _blocks(1)}
    candidate = {"code": [x + 0.2 for x in parent["code"]], "legal": [x - 0.1 for x in parent["legal"]]}
    decision = judge(parent, candidate, bootstrap=200, seed=3)
    assert not decision.passed
    assert decision.worse == ["code"]
    code = decision.domains[0]
    assert code.change == pytest.approx(0.2)
    assert 0 < code.interval[0] <= code.change <= code.interval[1]
    assert "code" in decision.reason() and "legal" not in decision.reason()


def test_a_change_within_the_noise_passes_and_a_better_candidate_passes():
    parent = {"code": _blocks(0)}
    rng = np.random.default_rng(9)
    noisy = {"code": [x + d for x, d in zip(parent["code"], rng.normal(0.0, 0.3, 40), strict=True)]}
    noisy["code"][0] += 0.05 * 40 * 0.1  # a small mean rise, far inside the per-block noise
    assert judge(parent, noisy, bootstrap=300, seed=1).passed
    better = {"code": [x - 0.05 for x in parent["code"]]}
    decision = judge(parent, better)
    assert decision.passed and decision.domains[0].change < 0


def test_a_non_finite_candidate_is_worse_and_bad_input_is_refused():
    parent = {"code": _blocks(0, n=4)}
    decision = judge(parent, {"code": [1.0, math.nan, 1.0, 1.0]})
    assert not decision.passed
    with pytest.raises(ValueError, match="no losses on domain"):
        judge(parent, {"legal": [1.0] * 4})
    with pytest.raises(ValueError, match="equal, non-empty"):
        judge(parent, {"code": [1.0] * 3})
    with pytest.raises(ValueError, match="at least one domain"):
        judge({}, {})
