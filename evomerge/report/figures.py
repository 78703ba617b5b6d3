"""The report's PNGs (matplotlib's Agg canvas, no pyplot state): history, best recipe, per-task scores, Pareto front.

Each function takes plain data, writes one PNG atomically (temp + rename) and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.candidate.baseline import BaselineLabel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from evomerge.candidate.space import SearchSpace
    from evomerge.report.compare import Comparison

KIND_COLORS = {"source": "Blues", "default": "Oranges", "oracle": "Greys", "evolved": "Greens", "portable": "Purples"}


@dataclass(frozen=True)
class TrialPoint:
    number: int
    objective: float
    # the enqueued baseline's label (evomerge.candidate.baseline: "defaults", "only add"); "" if sampled
    baseline: str = ""
    scores: tuple[float, ...] = ()  # per search task (for the Pareto front)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Figure, out: Path | str) -> Path:
    from evomerge.io.atomic import savefig_atomic

    return savefig_atomic(fig, out)


BASELINE_STYLES = [("^", "tab:purple"), ("v", "tab:red"), ("<", "tab:brown"), (">", "tab:pink"), ("D", "tab:olive")]


def history_png(
    points: Sequence[TrialPoint],
    out: Path | str,
    objective_label: str = "search objective",
    exported: int | None = None,
) -> Path:
    """Score per COMPLETE trial, the enqueued baselines told apart (the default merge, each model alone), the
    exported trial ringed, and the best-so-far line."""
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    points = sorted(points, key=lambda p: p.number)
    sampled = [p for p in points if not p.baseline]
    ax.scatter(
        [p.number for p in sampled],
        [p.objective for p in sampled],
        s=22,
        color="tab:blue",
        label="sampled trial",
        zorder=3,
    )
    _baselines(ax, points)
    chosen = next((p for p in points if p.number == exported), None)
    if chosen is not None:
        ax.scatter(
            [chosen.number],
            [chosen.objective],
            s=220,
            facecolors="none",
            edgecolors="black",
            linewidths=1.6,
            label=f"exported (trial {chosen.number})",
            zorder=5,
        )
    best, xs, ys = -math.inf, [], []
    for p in points:
        best = max(best, p.objective)
        xs.append(p.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="tab:green", linewidth=2, label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective_label)
    ax.set_title(f"Optimization history ({len(points)} complete trials)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: it would hide trials
    return _save(fig, out)


def _baselines(ax, points: Sequence[TrialPoint]) -> None:
    """The enqueued baselines, each label its own marker: the default merge a square, each model alone another."""
    labels = list(dict.fromkeys(p.baseline for p in points if p.baseline))
    alone = iter(BASELINE_STYLES * (len(labels) // len(BASELINE_STYLES) + 1))
    for label in labels:
        group = [p for p in points if p.baseline == label]
        baseline = BaselineLabel(label)
        marker, color = ("s", "tab:orange") if baseline.is_defaults else next(alone)
        ax.scatter(
            [p.number for p in group],
            [p.objective for p in group],
            s=46,
            marker=marker,
            color=color,
            edgecolor="black",
            linewidth=0.5,
            label=baseline.describe(),
            zorder=4,
        )


def _columns(space: SearchSpace) -> list[tuple[str, str]]:
    """(key, label) of the heatmap's columns: embeddings, each layer group (or all layers), whole model."""
    spec = space.spec
    cols: list[tuple[str, str]] = []
    if spec.embeddings:
        cols.append(("embed", "embed +\nlm_head"))
    if space.n_groups > 1:
        for g in range(space.n_groups):
            if spec.control_points:
                pos = g / (spec.control_points - 1)
                cols.append((f"g{g}", f"layer pos\n{pos:.2f}"))
            else:
                lpg = spec.layers_per_group
                first, last = g * lpg, min((g + 1) * lpg, space.num_layers) - 1
                cols.append((f"g{g}", f"L{first}" if first == last else f"L{first}-{last}"))
    else:
        cols.append(("all", "all layers"))
    if spec.kinds or any(not p.per_layer for p in spec.parameters.values() if p.searched):
        cols.append(("global", "whole\nmodel"))  # global parameters, and the tensors no kind matches (norms)
    return cols


def params_png(
    space: SearchSpace, models: Sequence[str], params: dict[str, float], out: Path | str, title: str
) -> Path:
    """Heatmap of a trial's searched values: rows = model x parameter (x tensor kind) with its search range,
    columns = layer groups. The cell text is the value itself (as the recipe has it, 3 significant digits shown);
    the colour is its position within the parameter's range."""
    import numpy as np
    from matplotlib import colormaps

    from evomerge.candidate.space import REST

    slots = space.slots(list(models))
    cols = _columns(space)
    col_index = {key: i for i, (key, _) in enumerate(cols)}
    rows: dict[str, list[float]] = {}
    raw: dict[str, list[float]] = {}
    for s in slots:
        ps = space.spec.parameters[s.param]
        label = " / ".join(x for x in (s.model or "all models", s.param, None if s.kind == "embed" else s.kind) if x)
        label += f"  [{ps.low:g}, {ps.high:g}]"
        if not ps.per_layer or s.kind == REST:
            key = "global"
        elif s.kind == "embed":
            key = "embed"
        else:
            key = "all" if s.group is None else f"g{s.group}"
        value = float(params[s.name])
        rows.setdefault(label, [math.nan] * len(cols))[col_index[key]] = (value - ps.low) / (ps.high - ps.low)
        raw.setdefault(label, [math.nan] * len(cols))[col_index[key]] = value
    labels = list(rows)
    grid = np.array([rows[r] for r in labels], dtype=float)
    fig = _figure(
        max(5.0, 1.0 + 0.85 * len(cols) + 0.08 * max(len(x) for x in labels)), max(2.6, 1.6 + 0.36 * len(labels))
    )
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), [c[1] for c in cols], fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("layer group")
    ax.set_ylabel("model / parameter / tensor kind")
    ax.set_title(title, fontsize=10)
    for i, label in enumerate(labels):
        for j, value in enumerate(raw[label]):
            if not math.isnan(value):
                shade = grid[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.3g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if shade > 0.6 else "white",
                )
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("colour: position in the row's range\n(0 = low, 1 = high)", fontsize=8)
    return _save(fig, out)


def _palette(comparison: Comparison) -> list:
    import numpy as np
    from matplotlib import colormaps

    colors = []
    for kind in KIND_COLORS:
        rows = comparison.rows_of(kind)  # type: ignore[arg-type]
        shades = np.linspace(0.45, 0.85, len(rows)) if len(rows) > 1 else [0.7]
        colors += [colormaps[KIND_COLORS[kind]](float(x)) for x in shades]
    return colors


def scores_png(comparison: Comparison, out: Path | str) -> Path:
    """Grouped bars: per held-out task (and the mean), one bar per compared model."""
    import numpy as np

    ordered = [r for kind in KIND_COLORS for r in comparison.rows_of(kind)]  # type: ignore[arg-type]
    groups = [*comparison.tasks, "mean"]
    colors = _palette(comparison)
    fig = _figure(max(7.5, 1.2 * len(groups) * max(1, len(ordered)) / 4 + 3.5), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / len(ordered)
    x = np.arange(len(groups))
    for i, (row, color) in enumerate(zip(ordered, colors)):
        values = [row.scores[t] for t in comparison.tasks] + [row.mean]
        bars = ax.bar(
            x - 0.4 + width * (i + 0.5), values, width, label=row.name, color=color, edgecolor="black", linewidth=0.4
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    metrics = sorted(set(comparison.metrics.values()))
    ax.set_xticks(x, groups)
    ax.set_xlabel("held-out task")
    ax.set_ylabel(f"held-out {' / '.join(metrics)}")
    ax.set_ylim(0, 1.18 if all(0 <= r.mean <= 1 for r in ordered) else None)  # room for the value labels
    ax.set_title("Held-out scores of the compared models")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="model", title_fontsize=8)
    return _save(fig, out)


def pareto_png(points: Sequence[TrialPoint], front: set[int], tasks: Sequence[str], out: Path | str) -> Path:
    """Scatter of two search objectives over the COMPLETE trials, the Pareto front highlighted."""
    fig = _figure(5.8, 4.8)
    ax = fig.add_subplot()
    rest = [p for p in points if p.number not in front]
    on = sorted((p for p in points if p.number in front), key=lambda p: p.scores[0])
    ax.scatter(
        [p.scores[0] for p in rest], [p.scores[1] for p in rest], s=20, color="tab:gray", alpha=0.6, label="trial"
    )
    ax.plot([p.scores[0] for p in on], [p.scores[1] for p in on], "o-", color="tab:red", label="Pareto front")
    for p in on:
        ax.annotate(str(p.number), (p.scores[0], p.scores[1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{tasks[0]} (search score)")
    ax.set_ylabel(f"{tasks[1]} (search score)")
    ax.margins(0.1)  # room for the trial labels at the edges
    ax.set_title("Pareto front of the search objectives")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, out)


__all__ = ["TrialPoint", "history_png", "params_png", "pareto_png", "scores_png"]
