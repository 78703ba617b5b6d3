"""`evomerge status RUN_DIR`: what a study holds, as text (counts, top trials, failures, timing, Pareto front)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from evomerge.errors import StudyError
from evomerge.search.config import load_run_config


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def timing_breakdown(trials) -> dict[str, float] | None:
    """Median seconds per completed trial: merge, eval, everything else (sampler, Ray, storage), total."""
    rows = [t.user_attrs for t in trials if "total_s" in t.user_attrs]
    if not rows:
        return None
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    other = statistics.median(r["total_s"] - r["merge_s"] - r["eval_s"] for r in rows)
    total = med("total_s")
    return {"merge_s": med("merge_s"), "eval_s": med("eval_s"), "other_s": other, "total_s": total, "n": len(rows)}


def status_text(run_dir: Path | str, top: int = 5, failures: int = 5) -> str:
    import optuna

    from evomerge.search.study import load_study, objective_of, pareto_front, stale_reason

    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    if study is None:
        raise StudyError(f"{run_dir}: study {cfg.name!r} is not in {cfg.storage_url}; run `evomerge search` first")
    trials = study.get_trials(deepcopy=False)
    by_state: dict[str, int] = {}
    for t in trials:
        by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    tasks = [t.name for t in cfg.tasks.search]
    lines = [
        f"study {cfg.name} ({cfg.method}, {cfg.sampler.name} sampler) in {cfg.storage_url}",
        f"budget: {len(done)}/{cfg.budget.n_trials} complete; trials by state: "
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(by_state.items())),
    ]

    def row(t) -> list[str]:
        scores = t.user_attrs.get("scores", {})
        metric = {s.name: s.metric for s in cfg.tasks.search}
        cells = [f"{scores.get(n, {}).get(metric[n], float('nan')):.3f}" for n in tasks]
        label = t.user_attrs.get("baseline") or (f"retry of {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")
        return [str(t.number), f"{objective_of(t):.4f}", *cells, f"{t.user_attrs.get('total_s', 0):.1f}", label]

    header = ["trial", "objective", *tasks, "s", "note"]
    if done:
        ranked = sorted(done, key=lambda t: (-objective_of(t), t.number))[:top]
        lines += ["", f"top {len(ranked)} trials:", *_table(header, [row(t) for t in ranked])]
    if len(study.directions) > 1 and done:
        front = pareto_front(study)
        lines += ["", f"Pareto front ({len(front)} trials):", *_table(header, [row(t) for t in front])]
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    if running:
        now = time.time()
        lines += ["", "running:"]
        for t in running:
            age = now - t.datetime_start.timestamp() if t.datetime_start else 0
            stale = stale_reason(t)
            lines.append(f"  trial {t.number}: {age:.0f} s" + (f" (stale: {stale})" if stale else ""))
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL][-failures:]
    if failed:
        lines += ["", "recent failures:"]
        lines += [f"  trial {t.number}: {t.user_attrs.get('fail_reason', '(no reason recorded)')}" for t in failed]
    timing = timing_breakdown(done)
    if timing:
        share = timing["other_s"] / timing["total_s"] * 100 if timing["total_s"] else 0.0
        lines += [
            "",
            f"per trial (median of {timing['n']}): merge {timing['merge_s']:.2f} s, eval {timing['eval_s']:.2f} s, "
            f"other {timing['other_s']:.3f} s ({share:.1f}%), total {timing['total_s']:.2f} s",
        ]
    return "\n".join(lines)


__all__ = ["status_text", "timing_breakdown"]
