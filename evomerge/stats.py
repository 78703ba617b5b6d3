"""Paired differences: two models scored on the same examples, compared example by example.

    mean, var = paired_mean(a, b)                     # a - b per example: the mean, and the variance of that mean
    mean, var = paired_mean(a, b, population=200)     # the n examples are a sample of 200: finite-population corrected

Pairing removes what both models find easy or hard, so the difference's standard error is smaller than the
unpaired one. Used by the report's noise judgement (`report/noise.py`) and by staged evaluation
(`scoring/staged.py`), which compares a candidate with the incumbent on the examples both have scored.
"""

from __future__ import annotations

from collections.abc import Sequence


def paired_mean(a: Sequence[float], b: Sequence[float], population: int | None = None) -> tuple[float, float]:
    """(mean of a - b over the paired examples, the variance of that mean): the differences' sample variance / n,
    times the finite-population correction 1 - n/N when the n examples are a sample of `population` N (so it is 0
    once every example is scored). 0 for a single example."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    if n < 2:
        return mean, 0.0
    s2 = sum((x - mean) ** 2 for x in d) / (n - 1)
    fpc = 1.0 if population is None else max(0.0, 1 - n / population)
    return mean, s2 / n * fpc


__all__ = ["paired_mean"]
