"""The one retry schedule (:class:`cogen.core.backoff.Backoff`): exponential, capped, jittered.
(The coordinator's unjittered use is held by ``test_coordinator_restart``; a node's per-source use by
``test_fetch_recovery``.)"""

from __future__ import annotations

import random

import pytest

from cogen.core.backoff import Backoff


def test_jittered_delays_stay_within_their_band_and_under_the_cap() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0, jitter=0.5, rng=random.Random(0))
    delays = [backoff.failed() for _ in range(8)]
    for i, d in enumerate(delays):
        full = min(8.0, 2.0**i)
        assert 0.5 * full <= d <= full
    assert backoff.delay() == delays[-1]  # the wait after the last failure, not a new draw
    assert len(set(delays)) == len(delays)  # drawn per failure: nodes that failed together spread out


def test_two_backoffs_with_different_seeds_do_not_return_in_step() -> None:
    a = Backoff(1.0, 60.0, jitter=0.5, rng=random.Random(1))
    b = Backoff(1.0, 60.0, jitter=0.5, rng=random.Random(2))
    assert [a.failed() for _ in range(5)] != [b.failed() for _ in range(5)]


def test_a_success_starts_over_and_no_jitter_is_exact() -> None:
    backoff = Backoff(base_s=2.0, cap_s=5.0)
    assert [backoff.failed() for _ in range(4)] == [2.0, 4.0, 5.0, 5.0]
    backoff.succeeded()
    assert backoff.delay() == 0.0 and backoff.failures == 0 and backoff.failed() == 2.0
    for _ in range(10_000):  # a long outage neither overflows nor passes the cap
        backoff.failed()
    assert backoff.delay() == 5.0


@pytest.mark.parametrize("kwargs", [{"base_s": 0.0, "cap_s": 1.0}, {"base_s": 2.0, "cap_s": 1.0},
                                    {"base_s": 1.0, "cap_s": 2.0, "jitter": 1.0}])  # fmt: skip
def test_a_schedule_that_cannot_work_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)
