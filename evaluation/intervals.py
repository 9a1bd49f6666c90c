"""Confidence intervals of rates measured on a finite number of samples.

Wilson's score interval (Wilson, 1927, "Probable Inference, the Law of Succession, and Statistical
Inference"): for k successes in n independent trials, the set of rates p whose normal-approximation test
does not reject k/n at level z. Unlike the Wald interval p̂ ± z·sqrt(p̂(1−p̂)/n), it stays inside [0, 1] and
does not collapse to a point at 0/n or n/n, which matters at the 32 seeds of the composition report.
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) bounds of the rate behind `successes` of `trials` independent trials (95% by default)."""
    if trials <= 0:
        raise ValueError(f"a rate needs at least one trial, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and {trials}, got {successes}")
    rate, z2 = successes / trials, z * z
    centre = (rate + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
