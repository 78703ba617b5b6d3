"""`evomerge status RUN_DIR`: what a study holds, as text (counts, the exported trial, top trials, failures,
timing, Pareto front)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from evomerge.study.record import StudyRecord, TrialRecord
from evomerge.study.trials import budget_count, by_state, is_whole, objective_of, pareto_front, ranked
from evomerge.tables import text_table


def timing_breakdown(trials) -> dict[str, float] | None:
    """Median seconds per completed trial: merge, eval, everything else (sampler, Ray, storage), total."""
    rows = [r for r in map(TrialRecord.from_trial, trials) if r.total_s is not None]
    if not rows:
        return None
    merge, ev, total = (statistics.median(getattr(r, key) for r in rows) for key in ("merge_s", "eval_s", "total_s"))
    other = statistics.median(r.total_s - r.merge_s - r.eval_s for r in rows)
    return {"merge_s": merge, "eval_s": ev, "other_s": other, "total_s": total, "n": len(rows)}


def exported_line(cfg, study) -> str | None:
    """Which trial `evomerge export` takes (and the report shows), and why; None before any trial completed."""
    from evomerge.validate.guard import exported_trial, pending, stored

    trial = exported_trial(cfg, study)
    if trial is None:
        return None
    head = f"exported trial: {trial.number} (objective {objective_of(trial):.4f}"
    waiting = pending(cfg, study)
    if cfg.validation is None:
        return head + ", the best search objective)"
    if not waiting:
        v = stored(cfg, study)[trial.number]
        return (
            head
            + f", validation {v.objective:.4f}: the best on validation of the top {cfg.validation.top_k}"
            + " and the baselines)"
        )
    return head + f"; trials {', '.join(map(str, waiting))} not validated yet: `evomerge export` validates them first)"


def portable_lines(cfg, study, run_dir: Path | str) -> list[str]:
    """When the exported trial is evomerge-only: the portable trial export writes beside it, and both held-out
    means with their difference and its paired standard error (from `evomerge report`'s comparison)."""
    from evomerge.validate.guard import exported_trial, portable_trial, stored

    chosen = exported_trial(cfg, study)
    other = portable_trial(cfg, study, chosen) if chosen is not None else None
    if other is None:
        return []
    v = stored(cfg, study).get(other.number)
    how = f", validation {v.objective:.4f}" if v is not None else ""
    lines = [
        f"portable trial: {other.number} (objective {objective_of(other):.4f}{how}): trial {chosen.number} is "
        "evomerge-only (mergekit-yaml merges another model from it); export writes this one, which mergekit-yaml "
        "reproduces, beside it (`export --portable`: in its place)"
    ]
    c = _comparison(run_dir, cfg.name)
    if c is None or c.best_trial != chosen.number or c.portable_trial != other.number:
        return lines + [f"  held-out: run `evomerge report {run_dir}` to score both"]
    verdict = c.verdict()
    return lines + [
        f"  held-out mean (evomerge report): evomerge-only {verdict.evolved.mean:.4f}, portable "
        f"{verdict.portable.mean:.4f}; evomerge-only - portable: {verdict.vs_portable.text()}"
    ]


def _comparison(run_dir: Path | str, study: str):
    """The report's comparison.json, or None."""
    from evomerge.report.compare import stored_comparison

    stored = stored_comparison(run_dir)
    return stored[0] if stored is not None and stored[0].study == study else None


def status_text(run_dir: Path | str, top: int = 5, failures: int = 5) -> str:
    from evomerge.study.study import open_run
    from evomerge.validate.guard import exported_trial

    cfg, study = open_run(run_dir)
    states = by_state(study)
    done = states.get("COMPLETE", [])
    own = [t for t in done if not TrialRecord.from_trial(t).portfolio]
    lines = _counts(cfg, study, states, done, own)
    exported = exported_line(cfg, study)
    if exported:
        lines.append(exported)
        lines += portable_lines(cfg, study, run_dir)
    if done:
        lines += _tables(cfg, study, done, exported_trial(cfg, study), top)
    return "\n".join(lines + _activity(study, states, own, failures))


def _counts(cfg, study, states: dict, done: list, own: list) -> list[str]:
    """The study, its budget and trials by state, the portfolio's trials, and what staged evaluation stopped."""
    lines = [
        f"study {cfg.name} ({cfg.method}, {cfg.sampler.name} sampler) in {cfg.storage_url}",
        f"budget: {budget_count(study)}/{cfg.budget.n_trials} complete; trials by state: "
        + ", ".join(f"{len(ts)} {s.lower()}" for s, ts in sorted(states.items())),
    ]
    portfolio = len(done) - len(own)
    if portfolio:
        lines.append(f"plus {portfolio} default merges of other methods, scored for comparison (not in the budget)")
    stopped = [t for t in own if not is_whole(t)]
    if stopped:
        counts = {t.number: TrialRecord.from_trial(t).examples_scored or 0 for t in own}
        full = max((counts[t.number] for t in own if is_whole(t)), default=0) * len(own)
        share = (
            f" ({100 * sum(counts.values()) / full:.0f}% of the examples a whole evaluation of every trial would score)"
            if full
            else ""
        )
        lines.append(
            f"stopped early: {len(stopped)} trials, clearly worse than the best after a part of the examples{share}"
        )
    return lines


def _tables(cfg, study, done: list, chosen, top: int) -> list[str]:
    """The top trials by the one ranking (the exported one always listed), the Pareto front, what the columns are."""
    tasks = [t.name for t in cfg.tasks.search]
    header = ["trial", "objective", *tasks, "s", "note"]
    listed = ranked(done)[:top]
    if chosen is not None and chosen not in listed:  # the exported trial is always listed
        listed.append(chosen)
    lines = [
        "",
        f"top {min(top, len(done))} trials by search objective"
        + (" and the exported one" if len(listed) > top else "")
        + ":",
        *text_table(header, [_row(cfg, t, chosen) for t in listed]).splitlines(),
    ]
    if len(study.directions) > 1:
        front = pareto_front(study)
        rows = [_row(cfg, t, chosen) for t in front]
        lines += ["", f"Pareto front ({len(front)} trials):", *text_table(header, rows).splitlines()]
    return lines + ["", *columns(cfg, tasks, {s.name: s.metric for s in cfg.tasks.search})]


def _row(cfg, t, chosen) -> list[str]:
    r = TrialRecord.from_trial(t)
    cells = [f"{r.task_value(s, float('nan')):.3f}" for s in cfg.tasks.search]
    label = r.baseline or (f"retry of {r.retry_of}" if r.retry_of is not None else "")
    if r.refine_round is not None:
        arm = f" ({r.refine_arm})" if r.refine_arm else ""
        label = f"refine {r.refine_round}{arm}, step {r.refine_step}"
    mark = "*" if chosen is not None and t.number == chosen.number else ""
    return [f"{t.number}{mark}", f"{objective_of(t):.4f}", *cells, f"{r.total_s or 0:.1f}", label]


def _activity(study, states: dict, own: list, failures: int) -> list[str]:
    """What is running, the recent failures and their reasons, and where a trial's time goes."""
    from evomerge.study.study import stale_reason

    lines = []
    running = states.get("RUNNING", [])
    if running:
        lines += ["", *running_lines(study, running, stale_reason)]
    failed = states.get("FAIL", [])[-failures:]
    if failed:
        lines += ["", "recent failures:"]
        for t in failed:
            why = TrialRecord.from_trial(t).fail_reason
            lines.append(f"  trial {t.number}: {'(no reason recorded)' if why is None else why}")
    timing = timing_breakdown(own)
    if timing:
        share = timing["other_s"] / timing["total_s"] * 100 if timing["total_s"] else 0.0
        lines += [
            "",
            f"per trial (median of {timing['n']}): merge {timing['merge_s']:.2f} s, eval {timing['eval_s']:.2f} s, "
            f"other {timing['other_s']:.3f} s ({share:.1f}%), total {timing['total_s']:.2f} s",
        ]
    return lines


def columns(cfg, tasks: list[str], metric: dict[str, str]) -> list[str]:
    """What the trial table's columns mean."""
    subsets = ", ".join(f"{t.name}: {t.subset or 'all'}" for t in cfg.tasks.search)
    return [
        "columns: trial (* = the trial `evomerge export` takes); objective = the weighted mean of the search "
        "tasks' scores, which the sampler maximizes;",
        f"  {', '.join(f'{n} = its {metric[n]}' for n in tasks)} on the fixed search subsets ({subsets} examples), "
        "never the held-out data;",
        "  s = seconds the trial took on its worker (merge + eval + waiting); note = an enqueued baseline "
        "(defaults, only <model>) or a retry of a trial whose worker died or was stopped.",
    ]


def running_lines(study, running: list, stale_reason) -> list[str]:
    """RUNNING trials: running only while a live driver holds the study; otherwise left by a search that stopped."""
    from evomerge.study.lock import describe, holder_alive

    holder = StudyRecord.from_study(study).lock
    if not holder or not holder_alive(holder):
        which = (
            f"trial {running[0].number} was"
            if len(running) == 1
            else f"trials {', '.join(str(t.number) for t in running)} were"
        )
        return [
            f"nothing is running: no search holds the study; {which} left RUNNING by a search that was killed, "
            "and the next `evomerge search` runs them again first"
        ]
    now = time.time()
    lines = [f"running (search {describe(holder)}):"]
    for t in running:
        age = now - t.datetime_start.timestamp() if t.datetime_start else 0
        stale = stale_reason(t)
        lines.append(f"  trial {t.number}: {age:.0f} s" + (f" (stale: {stale})" if stale else ""))
    return lines


__all__ = ["columns", "exported_line", "portable_lines", "running_lines", "status_text", "timing_breakdown"]
