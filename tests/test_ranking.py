"""Ranking experts: known Borda/BT answers, robustness to one odd domain, seeded bootstrap confidence,
the cheap ranking and its Kendall tau, per-block losses on the tiny model, the schema and the table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from merging_helpers import CPU, make_expert
from pydantic import ValidationError

from cogen.coordinator.merging.evaluate import block_losses, evaluate_blocks, evaluate_experts
from cogen.coordinator.merging.experts import load_experts
from cogen.coordinator.merging.ranking import (
    DeltaStats,
    attach_cheap,
    cheap_ranking,
    delta_statistics,
    kendall_tau,
    rank_experts,
)
from cogen.coordinator.merging.weights import confident_weights, format_ranking, ranking_weights
from cogen.core import models
from cogen.core.checkpoint import load_adapter
from cogen.core.evaluation import validation_loss
from cogen.protocols.manifest import EvalMatrix
from cogen.protocols.ranking import Ranking

DOMAINS = ["medical", "legal", "code", "literature", "news"]


def one_block(losses: dict[str, list[float]]) -> dict[str, dict[str, list[float]]]:
    """``expert -> [loss per domain]`` as single-block losses over DOMAINS."""
    return {e: {d: [v] for d, v in zip(DOMAINS, values, strict=True)} for e, values in losses.items()}


def noisy_blocks(
    rng: np.random.Generator, base: dict[str, np.ndarray], shifts: dict[str, float], noise: float = 0.02
) -> dict[str, dict[str, list[float]]]:
    """Per-block losses: the base's blocks minus ``shift``, plus independent per-block noise."""
    return {
        e: {d: list(b - shift + rng.normal(0, noise, b.shape)) for d, b in base.items()}
        for e, shift in shifts.items()
    }


def test_borda_points_and_bradley_terry_order_on_a_hand_made_matrix() -> None:
    base = {d: [2.0] for d in DOMAINS[:3]}
    experts = {  # per-domain orders: a<b<c, a<c<b, b<a<c  ->  Borda a 5, b 3, c 1
        "c": {"medical": [1.9], "legal": [1.7], "code": [1.9]},
        "b": {"medical": [1.6], "legal": [1.8], "code": [1.0]},
        "a": {"medical": [1.5], "legal": [1.6], "code": [1.5]},
    }
    ranking = rank_experts(base, experts, bootstrap=0)
    assert ranking.order == ["a", "b", "c"]
    assert {s.expert: s.borda for s in ranking.overall} == {"a": 5.0, "b": 3.0, "c": 1.0}
    strengths = [s.strength for s in ranking.overall]
    assert strengths[0] > strengths[1] > strengths[2] and abs(sum(strengths)) < 1e-9
    medical = ranking.per_domain["medical"]
    assert [e.expert for e in medical.experts] == ["a", "b", "c"] and medical.base_loss == 2.0
    assert medical.experts[0].improvement == pytest.approx(0.25)
    assert all(s.rank_confidence is None and s.rank_interval is None for s in ranking.overall)

    # a tie shares the points; an expert without a finite loss is last on that domain
    tied = rank_experts(base, {**experts, "b": {**experts["b"], "medical": [1.5]}}, bootstrap=0)
    assert {s.expert: s.borda for s in tied.overall}["a"] == 4.5
    broken = rank_experts(base, {**experts, "a": {**experts["a"], "code": [math.nan]}}, bootstrap=0)
    code = broken.per_domain["code"].experts
    assert code[-1].expert == "a" and code[-1].loss is None and code[-1].improvement is None

    # two experts, one wins every domain: regularised strengths are finite and mirror each other
    two = rank_experts(base, {"x": experts["a"], "y": experts["c"]}, bootstrap=0)
    x, y = two.overall
    assert (
        (x.expert, y.expert) == ("x", "y")
        and 0 < x.strength < 10
        and x.strength == pytest.approx(-y.strength)
    )


@pytest.mark.parametrize("odd", ["outlier", "noisy"])
def test_one_odd_domain_cannot_flip_the_overall_order(odd: str) -> None:
    rng = np.random.default_rng(0)
    base = {d: rng.uniform(2.5, 3.5, 24) for d in DOMAINS}
    experts = noisy_blocks(rng, base, {"a": 0.3, "b": 0.2, "c": 0.1})
    if odd == "outlier":  # a is 1000x worse on one domain
        experts["a"]["code"] = [1000 * v for v in experts["a"]["code"]]
    else:  # one noisy validation set on which c looks far better than it is
        experts["c"]["code"] = list(base["code"] - 2.0 + rng.normal(0, 1.0, 24))
    mean_loss = {e: np.mean([np.mean(v) for v in per_domain.values()]) for e, per_domain in experts.items()}
    assert sorted(mean_loss, key=mean_loss.__getitem__) != ["a", "b", "c"]  # the mean is fooled

    ranking = rank_experts(base, experts, bootstrap=100, seed=1)
    assert ranking.order == ["a", "b", "c"]  # the four domains that agree decide
    assert all(s.rank_confidence is not None and s.rank_confidence > 0.9 for s in ranking.overall)
    assert [e.expert for e in ranking.per_domain["medical"].experts] == ["a", "b", "c"]


def test_bootstrap_is_seeded_and_its_confidence_is_sensible() -> None:
    rng = np.random.default_rng(3)
    base = {d: rng.uniform(2.5, 3.5, 32) for d in DOMAINS[:4]}
    experts = noisy_blocks(rng, base, {"good": 0.5, "twin": 0.1}, noise=0.05)
    experts["twin-2"] = {d: list(v) for d, v in experts["twin"].items()}  # identical losses
    ranking = rank_experts(base, experts, bootstrap=200, seed=7)
    assert rank_experts(base, experts, bootstrap=200, seed=7) == ranking
    assert rank_experts(base, experts, bootstrap=200, seed=8) != ranking

    by_name = {s.expert: s for s in ranking.overall}
    assert ranking.order[0] == "good"
    assert by_name["good"].rank_confidence == 1.0 and by_name["good"].rank_interval == (1, 1)
    for twin in ("twin", "twin-2"):
        assert 0.35 < (by_name[twin].rank_confidence or 0) < 0.65  # a tie is a coin flip
        assert by_name[twin].rank_interval == (2, 3)
    low, high = by_name["good"].strength_interval or (0, 0)
    assert low <= by_name["good"].strength <= high
    improvement = ranking.per_domain["medical"].experts[0]
    lo, hi = improvement.improvement_interval or (0, 0)
    assert improvement.expert == "good" and lo < (improvement.improvement or 0) < hi and lo > 0


def test_confident_weights_ignore_an_improvement_within_the_noise() -> None:
    rng = np.random.default_rng(5)
    base = {d: rng.uniform(2.0, 4.0, 16) for d in DOMAINS[:2]}
    experts = noisy_blocks(rng, base, {"real": 0.3}, noise=0.01)
    lucky = base["medical"] + rng.normal(0, 0.5, 16)  # noise around the base, no real gain
    lucky -= lucky.mean() - base["medical"].mean() + 0.05  # its point estimate is a little better
    experts["lucky"] = {"medical": list(lucky), "legal": list(base["legal"] + 0.1)}
    ranking = rank_experts(base, experts, bootstrap=200, seed=0)
    matrix = EvalMatrix(
        domains=list(base),
        tokens_per_domain={d: 16 * 32 for d in base},
        base={d: float(b.mean()) for d, b in base.items()},
        experts={e: {d: float(np.mean(v)) for d, v in per.items()} for e, per in experts.items()},
    )
    assert ranking_weights(matrix)["lucky"] > 0  # the point rule keeps it
    weights = confident_weights(ranking)
    assert weights["lucky"] == 0.0 and 0 < weights["real"] < ranking_weights(matrix)["real"]


def test_aggregates_alone_rank_as_single_blocks() -> None:
    matrix = EvalMatrix(
        domains=["medical", "legal"],
        tokens_per_domain={"medical": 64, "legal": 64},
        base={"medical": 3.0, "legal": 3.0},
        experts={"x": {"medical": 2.0, "legal": None}, "y": {"medical": 2.5, "legal": 2.9}},
    )

    def one_block(losses: dict[str, float | None]) -> dict[str, list[float]]:  # a missing loss is NaN
        return {d: [math.nan if (v := losses.get(d)) is None else v] for d in matrix.domains}

    experts = {e: one_block(row) for e, row in matrix.experts.items()}
    ranking = rank_experts(one_block(matrix.base), experts, bootstrap=0)
    assert ranking.bootstrap == 0 and ranking.per_domain["legal"].experts[-1].expert == "x"
    assert confident_weights(ranking) == pytest.approx(ranking_weights(matrix))


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no experts"):
        rank_experts({"medical": [1.0]}, {})
    with pytest.raises(ValueError, match="'legal': the base has 2 block losses, expert 'x' 1"):
        rank_experts({"legal": [1.0, 2.0]}, {"x": {"legal": [1.0]}})
    with pytest.raises(ValueError, match="expert 'x' has no losses on domain 'legal'"):
        rank_experts({"legal": [1.0]}, {"x": {"medical": [1.0]}})


def test_kendall_tau_on_known_orders() -> None:
    assert kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert kendall_tau(["c", "b", "a"], ["a", "b", "c"]) == pytest.approx(-1.0)
    assert kendall_tau(["a", "c", "b"], ["a", "b", "c"]) == pytest.approx(1 / 3)
    assert kendall_tau(["z", "c", "b", "a"], ["a", "b", "c", "y"]) == pytest.approx(-1.0)  # common: a, b, c
    assert kendall_tau(["a"], ["a"]) is None and kendall_tau(["a", "b"], ["b", "c"]) is None
    with pytest.raises(ValueError, match="twice"):
        kendall_tau(["a", "a"], ["a", "b"])


def test_cheap_ranking_scores_filters_and_breaks_ties() -> None:
    stats = {
        "a": DeltaStats(norm=1.0, sign_agreement=0.6, nonfinite=0),
        "b": DeltaStats(norm=2.0, sign_agreement=0.9, nonfinite=0),
        "c": DeltaStats(norm=1.0, sign_agreement=0.8, nonfinite=0),
        "dead": DeltaStats(norm=0.0, sign_agreement=math.nan, nonfinite=0),
        "nan": DeltaStats(norm=math.nan, sign_agreement=0.7, nonfinite=3),
    }
    training = {"a": (4.0, 2.0), "b": (4.0, 3.0), "c": (2.0, 1.5), "dead": (4.0, 1.0), "nan": (4.0, 1.0)}
    cheap = cheap_ranking({**training, "silent": None}, stats)
    assert [c.expert for c in cheap.experts] == ["a", "b", "c", "dead", "nan", "silent"]  # b, c tie at 0.25
    assert [c.score for c in cheap.experts[:3]] == [0.5, 0.25, 0.25]
    reasons = [c.degenerate for c in cheap.experts[3:]]
    assert reasons == [
        "its delta is zero",
        "its delta holds 3 non-finite values",
        "no training loss reported",
    ]
    assert cheap.experts[4].delta_norm is None and cheap.experts[3].sign_agreement is None

    full = rank_experts(
        {"medical": [3.0]}, {e: {"medical": [float(i)]} for i, e in enumerate("cba")}, bootstrap=0
    )
    attached = attach_cheap(full, cheap_ranking({e: training[e] for e in "abc"}))
    assert attached.order == ["c", "b", "a"] and attached.cheap is not None
    assert attached.cheap.kendall_tau == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no experts"):
        cheap_ranking({})


@pytest.fixture(scope="module")
def expert_dirs(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ranking-experts")
    return [
        make_expert(tiny_path, root / "one", 1, expert="medical"),
        make_expert(tiny_path, root / "copy", 1, expert="medical"),
        make_expert(tiny_path, root / "other", 2, expert="legal"),
    ]


def test_delta_statistics_norm_matches_peft_and_copies_agree(tiny_path: str, expert_dirs: list[Path]) -> None:
    experts = load_experts(expert_dirs)
    stats = delta_statistics(experts)
    assert list(stats) == ["medical", "medical-2", "legal"]
    peft_model = load_adapter(models.load_base(tiny_path, "fp32", CPU), experts[0].path)
    squares = sum(
        float(peft_model.get_submodule(f"base_model.model.{m}").get_delta_weight("default").square().sum())
        for m in experts[0].modules
    )
    assert stats["medical"].norm == pytest.approx(math.sqrt(squares), rel=1e-5)
    assert stats["medical"].norm == pytest.approx(stats["medical-2"].norm) and stats["medical"].nonfinite == 0
    # where the copies and the independent third expert disagree in sign (about half the coordinates),
    # exactly one side is outvoted, mostly the third: the copies outweigh it twice
    copy, third = stats["medical"].sign_agreement, stats["legal"].sign_agreement
    assert copy == stats["medical-2"].sign_agreement and copy > third
    assert (1 - copy) + (1 - third) == pytest.approx(0.5, abs=0.05)
    assert delta_statistics(experts[2:])["legal"].sign_agreement == 1.0  # alone, it elects its own signs


def test_block_losses_average_to_validation_loss(tiny_path: str, expert_dirs: list[Path]) -> None:
    model = models.load_base(tiny_path, "fp32", CPU)
    generator = torch.Generator().manual_seed(0)
    blocks = {d: torch.randint(0, 1000, (5, 17), generator=generator) for d in ("medical", "code")}
    per_block = block_losses(model, blocks, batch_size=2)
    assert {d: len(v) for d, v in per_block.items()} == {"medical": 5, "code": 5}
    for domain, tokens in blocks.items():
        assert np.mean(per_block[domain]) == pytest.approx(validation_loss(model, tokens), rel=1e-6)
        assert per_block[domain][3] == pytest.approx(validation_loss(model, tokens[3:4]), rel=1e-6)

    experts = load_experts(expert_dirs[2:])
    code = {"code": blocks["code"]}
    model, matrix, losses = evaluate_blocks(model, experts, code)
    assert matrix.base["code"] == pytest.approx(np.mean(per_block["code"]), rel=1e-6)
    with_adapter = load_adapter(model, experts[0].path)
    expected = validation_loss(with_adapter, blocks["code"])
    model = with_adapter.unload()
    assert matrix.experts["legal"]["code"] == pytest.approx(expected, rel=1e-6)
    assert np.mean(losses.experts["legal"]["code"]) == pytest.approx(expected, rel=1e-6)
    assert evaluate_experts(model, experts, code)[1] == matrix  # the old shape, the same figures
    with pytest.raises(ValueError, match="medical: expected non-empty"):
        block_losses(model, {"medical": torch.zeros(0, 8, dtype=torch.long)})


def test_schema_round_trips_rejects_nan_and_the_table_reads() -> None:
    rng = np.random.default_rng(2)
    base = {d: rng.uniform(2.5, 3.5, 8) for d in DOMAINS[:3]}
    ranking = rank_experts(base, noisy_blocks(rng, base, {"medical": 0.3, "legal": 0.1}), bootstrap=50)
    ranking = attach_cheap(ranking, cheap_ranking({"medical": (3.0, 2.0), "legal": (3.0, math.nan)}))
    assert Ranking.model_validate_json(ranking.model_dump_json()) == ranking
    data = ranking.model_dump()
    data["overall"][0]["strength"] = math.nan
    with pytest.raises(ValidationError, match="finite"):
        Ranking.model_validate(data)
    table = format_ranking(ranking)
    lines = table.splitlines()
    assert lines[3].split()[:2] == ["1", "medical"] and lines[4].split()[:2] == ["2", "legal"]
    assert "  medical: medical +" in table and "legal (its training loss is not finite)" in table
    assert "Kendall tau with the full ranking +1.00" in table
