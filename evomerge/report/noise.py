"""Is a difference between two compared models more than noise? A paired comparison over the held-out examples.

    from evomerge.report.noise import paired_difference
    d = paired_difference(evolved_row, default_row)     # Difference: diff, se, n (0-1 scale)
    d.text()                            # "+0.9 points (paired SE 1.0 points over 600 examples): within noise"

Every row of the held-out comparison is scored on the same examples, so two rows are compared example by
example: per task, the mean of the per-example differences and its standard error (sample standard deviation
of the differences / sqrt(n)); the rows' means are unweighted means over tasks, so their difference is the mean
of the per-task differences and its variance the sum of the per-task variances over T^2. Pairing removes what
both models find easy or hard, so its standard error is smaller than the unpaired one. A difference under two
standard errors is reported as "within noise": the data do not tell the two apart. Differences are absolute
points (0-1 scores x 100), never a percent of a score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from evomerge.stats import paired_mean

if TYPE_CHECKING:
    from evomerge.report.compare import Row

NOISE_SE = 2.0  # a difference under this many standard errors is within noise
POINTS = 100.0  # 0-1 scores are shown in points


class Difference(BaseModel):
    """`a - b` on the score's own 0-1 scale, with the paired standard error where per-example values exist."""

    model_config = ConfigDict(frozen=True)

    diff: float
    se: float | None = None  # None: no per-example values for one of the rows (an older comparison.json)
    n: int = 0  # examples compared (all tasks)

    @property
    def within_noise(self) -> bool:
        """|diff| < 2 SE (an exact tie counts too). False when the SE is unknown: nothing to judge by."""
        return self.se is not None and (self.diff == 0 or abs(self.diff) < NOISE_SE * self.se)

    def points(self) -> str:
        """'+0.9 points'."""
        return f"{_clean(self.diff * POINTS):+.1f} points"

    def se_text(self) -> str:
        """'paired SE 1.0 points over 600 examples' (or why there is none)."""
        if self.se is None:
            return "no per-example scores to judge the noise"
        return f"paired SE {self.se * POINTS:.1f} points over {self.n} examples"

    def text(self) -> str:
        """'+0.9 points (paired SE 1.0 points over 600 examples): within noise' (or 'beyond noise')."""
        if self.se is None:
            return f"{self.points()} ({self.se_text()})"
        return f"{self.points()} ({self.se_text()}): {'within noise' if self.within_noise else 'beyond noise'}"


def _clean(x: float) -> float:
    """No '-0.0' in printed figures."""
    return 0.0 if round(x, 1) == 0 else x


def paired_difference(a: Row, b: Row, tasks: Sequence[str] | None = None) -> Difference:
    """`a.mean - b.mean` (or over `tasks` only: their unweighted mean), with its paired standard error when both
    rows carry per-example values for those tasks on the same examples."""
    tasks = list(tasks) if tasks is not None else list(a.scores)
    diff = sum(a.scores[t] - b.scores[t] for t in tasks) / len(tasks)
    paired = all(
        t in a.examples
        and t in b.examples
        and len(a.examples[t]) == len(b.examples[t]) > 0
        # the values must be the ones the scores average (acc, exact_match; not e.g. perplexity)
        and math.isclose(sum(a.examples[t]) / len(a.examples[t]), a.scores[t], abs_tol=1e-9)
        and math.isclose(sum(b.examples[t]) / len(b.examples[t]), b.scores[t], abs_tol=1e-9)
        for t in tasks
    )
    if not paired:
        return Difference(diff=diff)
    var = sum(paired_mean(a.examples[t], b.examples[t])[1] for t in tasks)
    return Difference(diff=diff, se=math.sqrt(var) / len(tasks), n=sum(len(a.examples[t]) for t in tasks))


__all__ = ["NOISE_SE", "Difference", "paired_difference"]
