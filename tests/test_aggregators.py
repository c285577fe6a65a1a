"""The robust aggregators on hand-made inputs with known answers, the screening rules, the probe seed."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cogen.core.config import GroupConfig
from cogen.node.aggregators import (
    CenteredClip,
    Mean,
    TrimmedMean,
    aggregator_names,
    coordinate_median,
    get_aggregator,
    register,
    trim_count,
)
from cogen.node.screening import (
    STEP_SLACK,
    Exclusions,
    Screened,
    group_step,
    parse_claims,
    reject_outlier_norms,
    reject_steps_ahead,
    weight_caps,
)
from cogen.node.wire import RoundVerifier, round_seed
from cogen.protocols import RoundReport
from cogen.protocols.group_round import RoundClaim, RoundRejected, parse_reveal

PEERS = ["12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"[:-1] + c for c in "abcd"]


def _members(*rows: list[float]) -> list[list[torch.Tensor]]:
    """One member per row, each a delta of one tensor."""
    return [[torch.tensor(row)] for row in rows]


def test_the_registry_knows_the_three_and_refuses_unknown_or_duplicate_names() -> None:
    assert aggregator_names() == ["centered_clip", "mean", "trimmed_mean"]
    assert not get_aggregator("mean").needs_all_deltas and get_aggregator("centered_clip").needs_all_deltas
    with pytest.raises(ValueError, match=r"unknown aggregator 'median'.*centered_clip, mean, trimmed_mean"):
        get_aggregator("median")
    with pytest.raises(ValueError, match="already registered"):
        register(TrimmedMean())


def test_mean_is_weighted() -> None:
    (out,) = Mean()(_members([0.0, 4.0], [3.0, 0.0]), [3.0, 1.0])
    assert torch.allclose(out, torch.tensor([0.75, 3.0]))


def test_trimmed_mean_drops_the_extremes_of_every_coordinate() -> None:
    assert [trim_count(n) for n in (2, 3, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    # the outlier is a different member in each coordinate; weights do not matter
    (out,) = TrimmedMean()(_members([1.0, -50.0], [2.0, 1.0], [3.0, 2.0], [100.0, 3.0]), [1e30, 1, 1, 1])
    assert torch.allclose(out, torch.tensor([2.5, 1.5]))
    (out,) = TrimmedMean()(_members([1.0], [2.0], [9.0]), [1, 1, 1])  # of three: the median
    assert torch.allclose(out, torch.tensor([2.0]))


def test_centered_clip_has_the_known_fixed_points() -> None:
    deltas = _members([0.0], [2.0], [4.0], [100.0])
    (median,) = coordinate_median(deltas)
    assert median.item() == 3.0
    # distances 3, 1, 1, 97: tau = 2; clipped steps -2, -1, +1, +2 cancel: v stays at 3
    (out,) = CenteredClip()(deltas, [1, 1, 1, 1])
    assert out.item() == pytest.approx(3.0)
    # three identical honest members: tau = 0, the result is theirs whatever the fourth sent
    honest = [[torch.tensor([1.0, -1.0]), torch.tensor([0.5])] for _ in range(3)]
    hostile = [[torch.tensor([1e6, 1e6]), torch.tensor([-1e6])]]
    result = CenteredClip()(honest + hostile, [1, 1, 1, 1])
    assert all(torch.equal(a, b) for a, b in zip(result, honest[0], strict=True))


def test_centered_clip_moves_at_most_tau_per_iteration_towards_a_far_member() -> None:
    g = torch.Generator().manual_seed(0)
    honest = [[torch.randn(64, generator=g)] for _ in range(3)]
    for scale in (1e2, 1e6):
        hostile = [[honest[0][0] * -scale]]
        (out,) = CenteredClip()(honest + hostile, [1.0] * 4)
        honest_mean = torch.stack([h[0] for h in honest]).mean(0)
        spread = max(float((h[0] - honest_mean).norm()) for h in honest)
        assert float((out - honest_mean).norm()) < 2 * spread  # bounded, whatever the scale


def test_aggregators_refuse_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same shapes"):
        TrimmedMean()([[torch.zeros(2)], [torch.zeros(3)]], [1, 1])
    with pytest.raises(ValueError, match="one weight per member"):
        CenteredClip()(_members([1.0], [2.0]), [1.0])


def _claim(step: int = 3, weight: float = 100.0, elapsed_s: float = 10.0) -> dict[str, object]:
    commit = hashlib.sha256(b"n").hexdigest()
    return RoundClaim(step=step, weight=weight, elapsed_s=elapsed_s, commit=commit).model_dump()


def test_malformed_claims_are_rejected_with_a_reason() -> None:
    screened = parse_claims({PEERS[0]: _claim(), PEERS[1]: {"step": -1}, PEERS[2]: "garbage"})
    assert screened.accepted == [PEERS[0]]
    assert set(screened.rejected) == {PEERS[1], PEERS[2]}
    assert "malformed round claim" in screened.rejected[PEERS[2]]
    with pytest.raises(RoundRejected):
        parse_reveal({"nonce": "00" * 32, "proj": [float("nan")], "sq": [1.0]})
    with pytest.raises(RoundRejected):
        parse_reveal({"nonce": "00" * 32, "proj": [0.0] * 513, "sq": [1.0] * 513})  # bounded


def test_the_groups_step_is_the_median_not_the_largest_claim() -> None:
    screened = parse_claims({p: _claim(step=s) for p, s in zip(PEERS, [5, 5, 4, 10**15], strict=True)})
    assert group_step(screened.claims) == 5
    reject_steps_ahead(screened)
    assert list(screened.rejected) == [PEERS[3]] and "10" in screened.rejected[PEERS[3]]
    # a few steps ahead (a member that missed fewer rounds) is no rejection
    close = parse_claims(
        {PEERS[0]: _claim(step=5), PEERS[1]: _claim(step=5 + STEP_SLACK), PEERS[2]: _claim(5)}
    )
    reject_steps_ahead(close)
    assert not close.rejected
    assert group_step(parse_claims({PEERS[0]: _claim(step=0), PEERS[1]: _claim(step=9)}).claims) == 9


def test_weights_are_capped_by_the_median_and_by_plausible_hardware() -> None:
    cfg = GroupConfig(max_weight_ratio=4.0, max_samples_per_s=100.0)
    weights = [100.0, 120.0, 900.0, 1e30]  # 10 s at 100 samples/s: 1000 plausible
    screened = parse_claims({p: _claim(weight=w) for p, w in zip(PEERS, weights, strict=True)})
    caps = weight_caps(screened, cfg)
    assert caps == {PEERS[0]: 100.0, PEERS[1]: 120.0, PEERS[2]: 900.0, PEERS[3]: 1000.0}
    weights = [100.0, 110.0, 120.0, 900.0]  # median 115: at most 460 counts
    caps = weight_caps(parse_claims({p: _claim(weight=w) for p, w in zip(PEERS, weights, strict=True)}), cfg)
    assert caps[PEERS[3]] == 460.0 and caps[PEERS[0]] == 100.0
    assert list(screened.rejected) == [PEERS[3]]  # over what any hardware could do: a rejection
    assert "plausible" in screened.rejected[PEERS[3]]


def test_update_norms_far_over_the_median_are_rejected() -> None:
    cfg = GroupConfig(max_norm_ratio=4.0)
    screened = Screened(claims={p: RoundClaim.model_validate(_claim()) for p in PEERS})
    reject_outlier_norms(screened, dict(zip(PEERS, [1.0, 1.2, 3.9, 100.0], strict=True)), cfg)
    assert list(screened.rejected) == [PEERS[3]]  # median 2.55: 100 is over 4x, 3.9 is not
    two = Screened(claims={p: RoundClaim.model_validate(_claim()) for p in PEERS[:2]})
    reject_outlier_norms(two, {PEERS[0]: 0.01, PEERS[1]: 5.0}, cfg)
    assert not two.rejected  # of two, neither can be told the outlier


def test_repeated_rejections_exclude_a_member_for_a_while() -> None:
    now = [0.0]
    exclusions = Exclusions(limit=2, exclude_s=60.0, clock=lambda: now[0])
    assert not exclusions.strike(PEERS[0], "norm")
    now[0] = 70.0  # the first strike is older than exclude_s: forgotten
    assert not exclusions.strike(PEERS[0], "norm")
    now[0] = 80.0
    assert exclusions.strike(PEERS[0], "norm") and exclusions.is_excluded(PEERS[0])
    assert exclusions.excluded() == [PEERS[0]]
    now[0] = 80.0 + 60.0
    assert not exclusions.is_excluded(PEERS[0]) and exclusions.excluded() == []
    report = RoundReport(outer_step=1, ok=False, reason="", group_size=4, duration_s=1.0, bytes_sent=0,
                         weight=1.0, time=1.0, rejected=[PEERS[1]], excluded=[PEERS[0]])  # fmt: skip
    assert RoundReport.model_validate(report.model_dump()) == report
    with pytest.raises(ValueError):
        RoundReport.model_validate({**report.model_dump(), "excluded": ["not a peer id"]})
    with pytest.raises(ValueError):
        RoundReport.model_validate({**report.model_dump(), "excluded": [PEERS[0]] * 33})


def test_the_probe_seed_depends_on_every_members_nonce() -> None:
    verifier = RoundVerifier([torch.zeros(5000), torch.zeros(300)], "none")
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert round_seed([a, b]) == round_seed([a, b])  # every member computes the same
    seeds = {round_seed([a, b]), round_seed([a, c]), round_seed([c, b]), round_seed([b, a])}
    assert len(seeds) == 4  # any one member's nonce changes it
    p1, p2 = verifier.probe(round_seed([a, b])), verifier.probe(round_seed([a, c]))
    assert not torch.equal(p1.signs, p2.signs)
    delta = [torch.randn(5000), torch.randn(300)]
    # a delta shaped to vanish on one round's probe does not vanish on the next one's
    assert verifier.checks(delta, p1).projections != verifier.checks(delta, p2).projections
