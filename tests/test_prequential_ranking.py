"""The cheap ranking from prequential claims, and its agreement with the full ranking."""

from __future__ import annotations

import pytest

from cogen.coordinator.merging.prequential import (
    agreement,
    cheap_weights,
    estimate,
    evaluation_tokens,
    prequential_ranking,
)
from cogen.protocols.prequential import LossRun, Prequential, StreamSpec


def claim(domain: str, base: list[float] | None, window: list[float], start: int = 100) -> Prequential:
    stream = StreamSpec(corpus=domain, shard=0, num_shards=1, seed=0, block_size=16, batch_size=4,
                        validation_fraction=0.05)  # fmt: skip
    return Prequential(
        generation=0, stream=stream, batches=start + len(window),
        window=LossRun(start=start, rows=[[w] for w in window]),
        base=LossRun(start=0, rows=[[b] for b in base]) if base else None,
    )  # fmt: skip


def noisy(center: float, n: int = 16, spread: float = 0.02) -> list[float]:
    return [center + spread * ((i % 4) - 1.5) for i in range(n)]


@pytest.mark.parametrize(
    ("cheap", "full", "tau", "top1"),
    [
        (["a", "b", "c", "d"], ["a", "b", "c", "d"], 1.0, True),
        (["d", "c", "b", "a"], ["a", "b", "c", "d"], -1.0, False),
        (["b", "a", "c", "d"], ["a", "b", "c", "d"], 2 / 3, False),  # 1 of 6 pairs discordant: (5 - 1) / 6
        (["a", "c", "b", "d", "e"], ["a", "b", "c", "d", "e"], 0.8, True),  # (9 - 1) / 10
        (["a", "x", "b"], ["b", "a"], -1.0, False),  # only the experts in both orders count
    ],
)
def test_agreement_on_hand_made_orders(cheap: list[str], full: list[str], tau: float, top1: bool) -> None:
    found = agreement(cheap, full, cheap_tokens=10, full_tokens=1000)
    assert found.kendall_tau == pytest.approx(tau) and found.top1 is top1
    assert (found.cheap_cost_tokens, found.full_cost_tokens) == (10, 1000)


def test_agreement_without_two_common_experts_has_no_tau() -> None:
    assert agreement(["a"], ["a"], 0, 1).kendall_tau is None
    with pytest.raises(ValueError, match="twice"):
        agreement(["a", "a"], ["a"], 0, 1)


def test_pooling_members_weights_by_count_and_keeps_the_spread_between_them() -> None:
    est = estimate("code", [claim("code", [4.0, 4.0], [2.0, 2.0]), claim("code", [6.0, 6.0], [3.0, 3.0])])
    assert est is not None and est.domain == "code" and est.batches == 4
    assert est.window == pytest.approx(2.5) and est.base == pytest.approx(5.0)
    # four batch losses 2, 2, 3, 3: sample variance 1/3, variance of their mean 1/12
    assert est.window_var_of_mean == pytest.approx(1 / 12)
    value, (low, high) = est.improvement(0.9) or (0.0, (0.0, 0.0))
    assert value == pytest.approx(0.5) and low < 0.5 < high
    assert estimate("code", []) is None


def test_domains_are_compared_by_the_fraction_of_what_is_achievable_on_them() -> None:
    estimates = {
        "easy-long": estimate("easy-long", [claim("easy", noisy(4.0), noisy(1.6))]),  # improvement 0.60
        "easy-short": estimate("easy-short", [claim("easy", noisy(4.0), noisy(2.8))]),  # 0.30
        "hard-long": estimate("hard-long", [claim("hard", noisy(4.0), noisy(3.6))]),  # 0.10
        "hard-short": estimate("hard-short", [claim("hard", noisy(4.0), noisy(3.8))]),  # 0.05
        "silent": None,
        "liar": estimate("liar", [claim("hard", noisy(4.0), noisy(0.5))]),
    }
    ranked = prequential_ranking(estimates, flagged={"liar": "claims do not hold"}, checked={"liar": 2})
    order = [e.expert for e in ranked.experts]
    # the hard domain's best (a raw 10 %) ranks above the easy domain's second (a raw 30 %)
    assert order[:2] == ["easy-long", "hard-long"] or order[:2] == ["hard-long", "easy-long"]
    assert order[2:4] == ["easy-short", "hard-short"] or order[2:4] == ["hard-short", "easy-short"]
    assert order[4:] == ["liar", "silent"] or order[4:] == ["silent", "liar"]
    entries = {e.expert: e for e in ranked.experts}
    base = sum(noisy(4.0)[:2]) / 2  # the base estimate: the first two batches (the rest saw a few steps)
    assert entries["easy-long"].improvement == pytest.approx((base - 1.6) / base)
    assert entries["easy-short"].score == pytest.approx(0.5, abs=0.03)  # half of what its domain allows
    assert entries["liar"].flagged == "claims do not hold" and entries["liar"].checked == 2
    assert entries["silent"].unscored == "no prequential claims" and entries["silent"].score is None
    assert entries["silent"].flagged is None and entries["easy-long"].unscored is None
    weights = cheap_weights(ranked)
    assert weights["liar"] == 0 and weights["silent"] == 0
    assert 0.9 < weights["easy-long"] <= 1 and 0.9 < weights["hard-long"] <= 1


def test_an_earlier_generations_achievement_sets_the_bar() -> None:
    estimates = {"only": estimate("only", [claim("code", noisy(4.0), noisy(3.6))])}  # 0.10
    alone = prequential_ranking(estimates).experts[0].score
    bar = prequential_ranking(estimates, achievable={"code": 0.4}).experts[0].score
    assert alone is not None and bar is not None and alone > 0.9 and bar == pytest.approx(alone / 4, rel=0.05)


def test_an_expert_that_got_worse_scores_below_zero_and_weighs_nothing() -> None:
    estimates = {
        "good": estimate("good", [claim("code", noisy(4.0), noisy(3.0))]),
        "diverged": estimate("diverged", [claim("code", noisy(4.0), noisy(7.0))]),
    }
    ranked = prequential_ranking(estimates)
    assert [e.expert for e in ranked.experts] == ["good", "diverged"]
    assert (ranked.experts[1].score or 0) < 0 and cheap_weights(ranked)["diverged"] == 0
    with pytest.raises(ValueError, match="no experts"):
        prequential_ranking({})


def test_an_expert_that_learned_a_lot_on_few_noisy_batches_keeps_most_of_its_weight() -> None:
    # a 20 % gain whose interval reaches below 0: cutting at the lower end would drop it from the merge
    learned = estimate("learned", [claim("legal", [10.8, 10.7], noisy(8.6, n=8, spread=3.0))])
    inside_noise = estimate("noise", [claim("code", [5.0, 5.1], noisy(5.0, n=8, spread=3.0))])
    ranked = prequential_ranking({"learned": learned, "noise": inside_noise})
    entries = {e.expert: e for e in ranked.experts}
    interval = entries["learned"].improvement_interval
    assert interval is not None and interval[0] < 0 < entries["learned"].improvement - 0.15
    weights = cheap_weights(ranked)
    assert 0.5 < weights["learned"] < 1  # shrunk by its noise, not cut to 0
    assert 0 <= weights["noise"] < 0.05 * weights["learned"]


def test_an_expert_without_a_usable_claim_is_unscored_and_says_why() -> None:
    estimates = {
        "no-base": estimate("no-base", [claim("code", None, noisy(3.0))]),
        "few": estimate("few", [claim("code", [4.0, 4.0], [3.0, 3.1])]),
        "good": estimate("good", [claim("code", noisy(4.0), noisy(3.0))]),
    }
    entries = {e.expert: e for e in prequential_ranking(estimates).experts}
    assert entries["good"].rank == 1 and entries["good"].score == pytest.approx(1.0, abs=0.05)
    assert entries["no-base"].score is None and "base" in (entries["no-base"].unscored or "")
    assert entries["few"].score is None and "2 claimed batches" in (entries["few"].unscored or "")
    assert all(e.flagged is None for e in entries.values())  # nothing refused: the full evaluation weighs
    weights = cheap_weights(prequential_ranking(estimates))
    assert weights == {"no-base": 0.0, "few": 0.0, "good": pytest.approx(1.0, abs=0.01)}


def test_evaluation_tokens_counts_every_model_on_every_block() -> None:
    assert evaluation_tokens(models=10, domains=4, blocks=8, block_size=128) == 40960


def test_a_refused_claim_raises_a_critical_alert() -> None:
    from cogen.coordinator.alerts import compute_alerts

    found = compute_alerts([], {}, {}, "1.0", 4, flagged={"legal": "claimed a loss of 0.050 at batch 7"})
    assert [(a.kind, a.severity, a.subject) for a in found] == [("claims_failed", "critical", "legal")]
    assert "0.050" in found[0].message and "not merged" in found[0].message
