"""The audit heatmap: rows = embed, layers, norm, lm_head; one panel per metric, columns = tensor kind."""

from __future__ import annotations

import math
from pathlib import Path

from evomerge.analysis.audit import KINDS, AuditReport

# metric -> (panel title, colormap, centre or None). A centred panel is a diverging scale around what unrelated
# task vectors give (cosine and rank correlation 0, sign conflict 0.5), as wide as the layers' largest distance from
# it: on real models the layers lie close to the centre, and a fixed -1..1 or 0..max scale (or one stretched by
# the final norm's near-identical deltas) shows one flat colour. Cells beyond the scale take its end colour and
# keep their value as text.
PANELS = {
    "cosine": ("cosine similarity\n(0 = unrelated)", "RdBu_r", 0.0),
    "spearman": ("Spearman rank corr.\n(0 = unrelated)", "RdBu_r", 0.0),
    "conflict": ("sign-conflict rate\n(0.5 = unrelated)", "RdBu_r", 0.5),
    "magnitude": ("||delta|| / ||base||", "viridis", None),
}
MIN_HALF_WIDTH = 0.02  # a centred scale spans at least centre +/- this (identical models: all at the centre)


def _grid(report: AuditReport, metric: str) -> list[list[float]]:
    grid = []
    for row in report.rows():
        values = []
        for kind in KINDS:
            g = report.get(row, kind)
            v = getattr(g, metric) if g is not None else None
            values.append(math.nan if v is None else v)
        grid.append(values)
    return grid


def _annotate(ax, data, vmin: float, vmax: float, centre: float | None) -> None:
    """Each cell's value, in white on the dark end of its colour map."""
    rows, cols = data.shape
    for y in range(rows):
        for x in range(cols):
            v = data[y, x]
            if math.isfinite(v):
                frac = (v - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                dark = frac > 0.75 or frac < 0.25 if centre is not None else frac < 0.5  # viridis: dark low
                ax.text(
                    x,
                    y,
                    f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.0e}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )


def plot_audit(report: AuditReport, out: Path | str) -> Path:
    """Write the heatmap PNG atomically (temp + rename) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report.rows()
    n = len(rows)
    annotate = n <= 40
    height = max(3.5, 0.28 * n + 1.8)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.3 * len(PANELS) + 1.2, height), constrained_layout=True)
    for ax, (metric, (title, cmap_name, centre)) in zip(axes, PANELS.items()):
        data = np.array(_grid(report, metric), dtype=float)
        finite = data[np.isfinite(data)]
        layers = data[[i for i, r in enumerate(rows) if r.startswith("layer ")]]
        scale = layers[np.isfinite(layers)] if np.isfinite(layers).any() else finite
        if centre is not None:
            half = max(float(np.abs(scale - centre).max()) if scale.size else 0.0, MIN_HALF_WIDTH)
            vmin, vmax = centre - half, centre + half
        else:
            vmin = 0.0
            vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        cmap = plt.get_cmap(cmap_name).with_extremes(bad="#dddddd")
        im = ax.imshow(
            np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(KINDS)), [k.replace("self_", "") for k in KINDS], fontsize=9)
        ax.set_yticks(range(n), rows, fontsize=8 if n <= 40 else 6)
        ax.set_xlabel("tensor kind", fontsize=9)
        if ax is axes[0]:
            ax.set_ylabel("layer", fontsize=9)
        beyond = finite.size and (finite.min() < vmin or finite.max() > vmax)
        fig.colorbar(im, ax=ax, shrink=0.9 if n > 10 else 1.0, pad=0.02, extend="both" if beyond else "neither")
        if annotate:
            _annotate(ax, data, vmin, vmax, centre)
    pair = " vs ".join(report.models)
    fig.suptitle(f"Task vectors against {report.base}: {pair}", fontsize=11)
    from evomerge.io.atomic import savefig_atomic

    try:
        return savefig_atomic(fig, out, dpi=120)
    finally:
        plt.close(fig)
