"""Per-example scores, a smooth objective, and staged evaluation that stops a clearly worse candidate early.

    units = example_units(values, probs, smooth=0.2)            # {leaf: {example: value}}
    objective = units_objective(scorer, units)                   # the search objective, from per-example units
    result = run_staged(scorer, model, tokenizer, stage_order(scorer, seed), stages=(0.2, 0.5),
                        incumbent=best_units, incumbent_objective=best_objective, z=2.0)

The search objective is a weighted mean over tasks of a mean over examples, so it can be built from per-example
values: each example's metric (`acc`: 0 or 1), optionally mixed with the answer's probability (`smooth`: exact
match on 100 examples moves in steps of 1%, the probability moves with every change of the weights).

Staged evaluation scores a candidate on growing slices of each task's subset (a fixed seeded order), and after each
slice but the last compares it with the incumbent (the best trial so far, scored on every example) on the same
examples: the paired difference of the objective and its standard error (finite-population corrected, so it
shrinks to 0 when every example is scored). When the difference plus `z` standard errors is still below zero, the
candidate is clearly worse and stops; its objective is then the paired estimate incumbent + difference, so a
sampler ranks it where it belongs while the full evaluations keep their exact values.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError
from evomerge.stats import paired_mean

if TYPE_CHECKING:
    from evomerge.scoring.scorer import Examples, Scorer, Scores


@dataclass(frozen=True)
class Staged:
    """A candidate's per-example units (on the examples it was scored on) and its objective."""

    units: dict[str, dict[int, float]]
    objective: float  # exact when every example was scored, else the paired estimate
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # lm-eval's aggregates of the last slice run
    stopped: bool = False
    n_examples: int = 0
    n_total: int = 0


def check_per_example(scorer: Scorer) -> None:
    """Per-example objectives need metrics that lm-eval averages over examples (acc, exact_match, ...)."""
    for spec in scorer.specs:
        for leaf in scorer.members[spec.name]:
            metric = spec.metric.split(",", 1)[0]
            agg = scorer.tasks[leaf].aggregation().get(metric)
            if getattr(agg, "__name__", "") != "mean":
                raise ConfigError(
                    f"task {leaf}: metric {spec.metric!r} is not a mean over examples, so it cannot be "
                    "scored per example (smooth, early_stop); use acc, acc_norm or exact_match"
                )


def shares(scorer: Scorer) -> dict[str, float]:
    """Each leaf task's share of the objective (spec weight, split over a tag's leaves, normalised)."""
    total = sum(spec.weight for spec in scorer.specs)
    return {
        leaf: spec.weight / len(scorer.members[spec.name]) / total
        for spec in scorer.specs
        for leaf in scorer.members[spec.name]
    }


def example_units(values: Examples, probs: Examples, smooth: float) -> dict[str, dict[int, float]]:
    """Per example: (1 - smooth) * metric + smooth * answer probability (the metric alone where no probability)."""
    if smooth == 0:
        return {leaf: dict(v) for leaf, v in values.items()}
    return {
        leaf: {i: (1 - smooth) * x + smooth * probs.get(leaf, {}).get(i, x) for i, x in v.items()}
        for leaf, v in values.items()
    }


def units_objective(scorer: Scorer, units: dict[str, dict[int, float]]) -> float:
    """The search objective from per-example units: the weighted mean over tasks of the mean over examples (a
    trial's stored objective is `study.trials.objective_of`)."""
    w = shares(scorer)
    return sum(w[leaf] * sum(u.values()) / len(u) for leaf, u in units.items() if u)


def stage_order(scorer: Scorer, seed: int) -> dict[str, list[int]]:
    """Each leaf's examples in a fixed seeded order: a prefix of it is a random sample of the subset."""
    out = {}
    for leaf in scorer.tasks:
        order = list(scorer.indices(leaf))
        random.Random(f"{seed}:{leaf}:stages").shuffle(order)
        out[leaf] = order
    return out


def paired_gap(
    scorer: Scorer, cand: dict[str, dict[int, float]], inc: dict[str, dict[int, float]], totals: dict[str, int]
) -> tuple[float, float]:
    """(difference of the objective estimated on the examples both scored, its standard error)."""
    w = shares(scorer)
    gap = var = 0.0
    for leaf, u in cand.items():
        if not u:
            continue
        mean, v = paired_mean(list(u.values()), [inc[leaf][i] for i in u], population=totals[leaf])
        gap += w[leaf] * mean
        var += w[leaf] ** 2 * v
    return gap, math.sqrt(var)


def run_staged(
    scorer: Scorer,
    model,
    tokenizer,
    order: dict[str, list[int]],
    *,
    stages: Sequence[float] = (),
    incumbent: dict[str, dict[int, float]] | None = None,
    incumbent_objective: float | None = None,
    z: float = 2.0,
    smooth: float = 0.0,
) -> Staged:
    """Score slice by slice (`stages`: fractions of each subset, then the rest), stopping early against
    `incumbent` (per-example units of the best trial, over every example) as the module docstring says."""
    totals = {leaf: len(o) for leaf, o in order.items()}
    units: dict[str, dict[int, float]] = {leaf: {} for leaf in order}
    chunks: list[tuple[Scores, dict[str, int]]] = []  # lm-eval's aggregates of each slice, and its sizes
    fractions = [f for f in stages if 0 < f < 1] + [1.0]
    if incumbent is None:
        fractions = [1.0]
    for f in fractions:
        chunk = {}
        for leaf, o in order.items():
            end = len(o) if f >= 1 else max(1, math.ceil(f * len(o)))
            chunk[leaf] = sorted(o[len(units[leaf]) : end])
        chunk = {leaf: c for leaf, c in chunk.items() if c}
        if chunk:
            scores, values, probs = scorer.score_examples(model, tokenizer, chunk)
            chunks.append((scores, {leaf: len(c) for leaf, c in chunk.items()}))
            for leaf, u in example_units(values, probs, smooth).items():
                units[leaf].update(u)
        seen = sum(map(len, units.values()))
        if f < 1 and incumbent is not None and incumbent_objective is not None:
            gap, se = paired_gap(scorer, units, incumbent, totals)
            if gap + z * se < 0:
                return Staged(
                    units,
                    incumbent_objective + gap,
                    _combine(scorer, chunks),
                    stopped=True,
                    n_examples=seen,
                    n_total=sum(totals.values()),
                )
    return Staged(
        units,
        units_objective(scorer, units),
        _combine(scorer, chunks),
        n_examples=sum(map(len, units.values())),
        n_total=sum(totals.values()),
    )


def _combine(scorer: Scorer, chunks: list[tuple[Scores, dict[str, int]]]) -> Scores:
    """lm-eval's aggregates over every slice scored: one slice as lm-eval reported it; several, each metric that
    lm-eval averages over examples weighted by the slices' sizes (exactly its mean over them all; metrics it
    aggregates otherwise, e.g. perplexity, cannot be combined and are left out)."""
    if len(chunks) == 1:
        return chunks[0][0]
    out: Scores = {}
    for leaf in {leaf for scores, _ in chunks for leaf in scores}:
        parts = [(scores[leaf], sizes[leaf]) for scores, sizes in chunks if leaf in scores]
        total = sum(n for _, n in parts)
        means = scorer.tasks[leaf].aggregation()
        out[leaf] = {
            m: sum(s[m] * n for s, n in parts) / total
            for m in parts[0][0]
            if getattr(means.get(m.split(",", 1)[0]), "__name__", "") == "mean"
        }
    return out


__all__ = [
    "Staged",
    "check_per_example",
    "example_units",
    "units_objective",
    "paired_gap",
    "run_staged",
    "shares",
    "stage_order",
]
