"""`build_report(run_dir)`: score the comparison, draw the figures, write `RUN_DIR/report/`.

evomerge report runs/demo            # runs/demo/report/{report.md,comparison.json,*.png}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.config.rundir import RunDir
from evomerge.io.atomic import write_file_atomic
from evomerge.report.compare import Comparison, compare_run, load_run
from evomerge.report.figures import TrialPoint, history_png, params_png, pareto_png, scores_png
from evomerge.report.markdown import render
from evomerge.study.record import TrialRecord


@dataclass
class ReportResult:
    report: Path
    comparison: Comparison
    figures: dict[str, Path] = field(default_factory=dict)


def _points(cfg, trials) -> list[TrialPoint]:
    from evomerge.study.trials import objective_of

    out = []
    for t in trials:
        r = TrialRecord.from_trial(t)
        per_task = tuple(float(r.task_value(s, float("nan"))) for s in cfg.tasks.search)
        out.append(TrialPoint(t.number, objective_of(t), r.baseline or "", per_task))
    return out


def draw_figures(cfg, study, done, comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    """caption -> PNG path, for every figure this study supports. The recipe figure shows the comparison's
    evolved row: THE exported trial (`validate.guard.exported_trial`), as the table does."""
    from evomerge.candidate.space import space_of
    from evomerge.study.trials import pareto_front

    points = _points(cfg, [t for t in done if not TrialRecord.from_trial(t).portfolio])
    metrics = "/".join(sorted({t.metric for t in cfg.tasks.search}))
    label = f"search objective (weighted mean {metrics})"
    history = history_png(points, out_dir / "history.png", label, exported=comparison.best_trial)
    figures = {"Optimization history": history}
    best = next(t for t in done if t.number == comparison.best_trial)
    space = space_of(cfg)
    if best.params and space.slots(cfg.models) and not TrialRecord.from_trial(best).portfolio:  # a portfolio pick is
        # another method's default merge: its params are a placeholder, its recipe says what it is
        title = (
            f"Exported recipe (trial {best.number}, {cfg.method})\ncell: its value; colour: position in the row's range"
        )
        caption = f"Best recipe parameters (trial {best.number})"
        figures[caption] = params_png(space, cfg.models, best.params, out_dir / "best_params.png", title)
    figures["Held-out scores per task"] = scores_png(comparison, out_dir / "scores.png")
    if comparison.multi_objective and len(cfg.tasks.search) >= 2:
        front = {t.number for t in pareto_front(study)}
        names = [t.name for t in cfg.tasks.search[:2]]
        figures["Pareto front"] = pareto_png(points, front, names, out_dir / "pareto.png")
    return figures


def build_report(
    run_dir: Path | str,
    *,
    top_k: int = 3,
    heldout: Sequence[str] | None = None,
    subset: int | None = None,
    log: Callable[[str], None] | None = print,
) -> ReportResult:
    """Score the held-out comparison and write `RUN_DIR/report/` (report.md, comparison.json, PNGs)."""
    run_dir = Path(run_dir)
    cfg, study, done = run = load_run(run_dir)
    comparison = compare_run(run_dir, top_k=top_k, heldout=heldout, subset=subset, log=log, run=run)
    files = RunDir.at(run_dir)
    out_dir = files.report
    figures = draw_figures(cfg, study, done, comparison, out_dir)
    write_file_atomic(files.comparison, comparison.model_dump_json(indent=2))
    relative = {caption: path.name for caption, path in figures.items()}
    report = write_file_atomic(files.report_md, render(comparison, relative))
    return ReportResult(report, comparison, figures)


__all__ = ["ReportResult", "build_report", "draw_figures"]
