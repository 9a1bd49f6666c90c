"""Wilson score intervals (`evaluation.intervals`) against hand-computed values and their defining property."""

from __future__ import annotations

import math

import pytest

from evaluation.intervals import Z_95, wilson_interval


def test_matches_the_closed_form_at_25_of_32() -> None:
    # p = 25/32, n = 32: centre (p + z²/2n)/(1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    low, high = wilson_interval(25, 32)
    assert low == pytest.approx(0.6125, abs=1e-4)
    assert high == pytest.approx(0.8898, abs=1e-4)


def test_bounds_solve_the_score_equation() -> None:
    # each bound p satisfies |k/n - p| = z·sqrt(p(1-p)/n)
    for successes, trials in [(3, 10), (50, 64), (1, 32)]:
        rate = successes / trials
        for bound in wilson_interval(successes, trials):
            assert abs(rate - bound) == pytest.approx(
                Z_95 * math.sqrt(bound * (1 - bound) / trials), rel=1e-9
            )


def test_edges_stay_inside_zero_and_one_without_collapsing() -> None:
    low, high = wilson_interval(0, 32)
    assert low == 0.0 and 0.09 < high < 0.12
    low, high = wilson_interval(32, 32)
    assert high == 1.0 and 0.88 < low < 0.91


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="between 0 and 4"):
        wilson_interval(5, 4)
