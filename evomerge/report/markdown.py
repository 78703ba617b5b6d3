"""report.md: the held-out comparison table, the plain verdict, search vs held-out for the top trials, figures."""

from __future__ import annotations

from evomerge.report.compare import Comparison, Verdict, comparison_rows
from evomerge.report.noise import NOISE_SE, paired_difference
from evomerge.tables import markdown_table


def _f(x: float) -> str:
    return f"{x:.4f}"


def statement(v: Verdict, metric: str = "score") -> str:
    """Whether the evolved recipe beats the best default merge, by how many points and whether that is more than
    noise (a paired comparison over the held-out examples, `report.noise`), and its share of the oracle."""
    e = v.evolved
    lines = []
    d = v.vs_default
    if v.best_default is None or d is None:
        lines.append(
            f"No default merge could be compared (see below); the evolved recipe scores {_f(e.mean)} mean held-out "
            f"{metric}."
        )
    else:
        vs = f"({_f(e.mean)} vs {_f(v.best_default.mean)}; {d.se_text()})"
        if d.within_noise:
            lines.append(
                f"The evolved recipe ({e.detail}) scores {d.points()} of mean held-out {metric} against the best "
                "default "
                f"merge, {v.best_default.name} {vs}: **within noise**; a difference under {NOISE_SE:g} standard "
                "errors does not tell the two apart."
            )
        elif v.beats_default:
            lines.append(
                f"The evolved recipe ({e.detail}) **beats** the best default merge, {v.best_default.name}, by "
                f"{d.points()} of mean held-out {metric} {vs}."
            )
        else:
            how = "ties with it" if v.margin == 0 else f"scores {d.points()}"
            lines.append(
                f"The evolved recipe ({e.detail}) does **NOT** beat the best default merge, {v.best_default.name}: "
                f"it {how} in mean held-out {metric} {vs}."
            )
    src, ds = v.best_source, v.vs_source
    if ds.within_noise:
        lines.append(
            f"It is within noise of the best single source model, {src.name} ({_f(src.mean)}; {ds.points()}, "
            f"{ds.se_text()})."
        )
    else:
        rel = "above" if e.mean > src.mean else ("equal to" if e.mean == src.mean else "below")
        lines.append(
            f"It is {rel} the best single source model, {src.name} ({_f(src.mean)}; {ds.points()}, {ds.se_text()})."
        )
    if v.oracle_fraction is not None:
        lines.append(
            f"It reaches {v.oracle_fraction * 100:.1f}% of the routing oracle's mean ({_f(v.oracle.mean)}: "
            "each task answered by its best source model)."
        )
    if v.room_share is not None:
        lines.append(
            f"Of the room between the floor ({v.floor.name}, {_f(v.floor.mean)}: the best of every default merge and "
            f"every single source) and the oracle ({v.room:.4f}), it captures {v.room_share * 100:.0f}%."
        )
    return " ".join(lines + portable_statement(v))


def portable_statement(v: Verdict) -> list[str]:
    """When the evolved recipe is evomerge-only: the best portable recipe's held-out mean beside it, and the
    difference with its paired standard error (what shipping through mergekit gives up)."""
    if v.portable is None or v.vs_portable is None:
        return []
    p, d = v.portable, v.vs_portable
    return [
        f"The evolved recipe is evomerge-only (`evomerge merge` reproduces it, `mergekit-yaml` does not); the best "
        f"portable recipe (trial {v.portable_trial}, which `mergekit-yaml` reproduces, exported beside it) scores "
        f"{_f(p.mean)} against its {_f(v.evolved.mean)}: the evomerge-only recipe is {d.text()}."
    ]


def differences(c: Comparison) -> list[str]:
    """The evolved row against every other row: paired differences in points, their standard errors, and which
    are within noise (works for whatever rows the comparison has)."""
    evolved = c.rows_of("evolved")[0]
    rows = []
    for r in c.rows:
        if r is evolved:
            continue
        d = paired_difference(evolved, r, c.tasks)
        se = "-" if d.se is None else f"{d.se * 100:.1f}"
        verdict = "-" if d.se is None else ("within noise" if d.within_noise else ("better" if d.diff > 0 else "worse"))
        rows.append([r.name, d.points().removesuffix(" points"), se, verdict])
    return markdown_table(["evolved against", "difference (points)", "paired SE (points)", "verdict"], rows, "lrrl")


def render(c: Comparison, figures: dict[str, str]) -> str:
    """The report; `figures` maps a caption to a PNG path relative to report.md."""
    metric = "/".join(sorted(set(c.metrics.values())))
    subset = f"a fixed seeded sample of {c.subset} examples per task" if c.subset else "every example"
    v = c.verdict()
    lines = [
        f"# evomerge report: study `{c.study}`",
        "",
        f"`{c.method}` merge searched with the `{c.sampler}` sampler; {c.n_complete} complete trials; "
        f"best trial {c.best_trial}. Held-out tasks (never seen by the search): "
        + ", ".join(f"`{t}` ({c.metrics[t]})" for t in c.tasks)
        + f", scored on {subset}.",
        "",
        "## Held-out comparison",
        "",
        *_right_aligned(*comparison_rows(c)),
        "",
        statement(v, metric),
        "",
        "Rows: the source models; each method's default merge (every parameter at its search-space default: "
        "the study's first, enqueued baseline for its own method); the routing oracle (per-task max over the "
        "sources, the multi-model pipeline a merge replaces); the best searched recipe; when that one is "
        "evomerge-only, the best portable recipe (one `mergekit-yaml` reproduces).",
        "",
    ]
    lines += [f"- **{r.name}**: {r.detail}" for r in c.rows if r.detail and r.kind in ("default", "oracle", "portable")]
    lines += [f"- {m}: not compared ({why})" for m, why in c.skipped.items()]
    lines += [
        "",
        "### Is the difference more than noise?",
        "",
        "Every row is scored on the same held-out examples, so each pair is compared example by example: the mean "
        "of the per-example differences and its standard error (paired; per task, then averaged over tasks). A "
        f"difference under {NOISE_SE:g} standard errors is within noise. Points are absolute (0-1 scores x 100).",
        "",
        *differences(c),
    ]
    lines += [
        "",
        f"## Search vs held-out (top {len(c.trials)} trials)",
        "",
        "The search objective is measured on the search subsets the sampler optimized; a trial whose held-out "
        "mean falls well below its search score has overfit them.",
        "",
        *_trials_table(c),
        "",
        "## Figures",
        "",
    ]
    for caption, path in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return "\n".join(lines)


def _trials_table(c: Comparison) -> list[str]:
    """The top trials' search objective next to their held-out scores (and validation, where the guard ran)."""
    header = [
        "trial",
        "note",
        "search objective",
        *(f"held-out {t}" for t in c.tasks),
        "held-out mean",
        "held-out - search",
    ]
    rows = [
        [
            str(t.number),
            t.note or "-",
            _f(t.search),
            *(_f(t.heldout[x]) for x in c.tasks),
            _f(t.heldout_mean),
            f"{t.heldout_mean - t.search:+.4f}",
        ]
        for t in c.trials
    ]
    if any(t.validation is not None for t in c.trials):  # the overfitting guard re-scored the top trials
        header.insert(3, "validation objective")
        for row, t in zip(rows, c.trials):
            row.insert(3, "-" if t.validation is None else _f(t.validation))
    return _right_aligned(header, rows)


def _right_aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """Numbers right-aligned, the first (label) column left."""
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


__all__ = ["differences", "portable_statement", "render", "statement"]
