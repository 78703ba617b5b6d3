"""The time plan against a measured search: the seconds per trial the resource plan predicts, by part
(evomerge/capacity/timing.py), beside what a real search of the same config takes on this machine.

    .venv/bin/python bench/time_plan.py configs/demo.yaml --n-trials 30                  # the demo zoo
    .venv/bin/python bench/time_plan.py my_135m.yaml --n-trials 12 --json /tmp/t.json     # a real model
    .venv/bin/python bench/time_plan.py --fit zoo.json 135m.json gen.json --check a.json b.json   # refit

`--fit` solves evomerge/capacity/timing.py's constants (least squares, non-negative) from the runs' measured parts
and recorded probe rates, and prints them with every run's plan / measured under them (the `--check` runs are not
fitted on: they test the fit).

The search runs in a scratch folder with staged evaluation off (every trial scored whole, as the plan counts it)
and without the portfolio (the plan's trials alone); its refinement rounds are the config's. Measured per part:
merge and evaluation, the trials' means (their `merge_s`, `eval_s`); refinement, the rounds' seconds (their
"done in" lines) over the trials; overhead, the rest of the wall time per trial (the run's first ask to its last
tell, over its trials). A figure measured on a busy machine is an upper bound; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PARTS = ("merge", "evaluation", "refinement", "overhead")


def measure(config: Path, n_trials: int) -> dict:
    from evomerge.capacity import plan_search
    from evomerge.config.schema import load_config
    from evomerge.run.driver import run_search
    from evomerge.study.record import TrialRecord
    from evomerge.study.storage import load_study
    from evomerge.study.trials import complete_trials

    cfg = load_config(config, n_trials=n_trials)
    cfg = cfg.model_copy(update={"early_stop": None, "portfolio": False})
    plan = plan_search(cfg)
    before = plan.timing
    lines: list[str] = []
    os.chdir(tempfile.mkdtemp(prefix="time-plan-"))
    started = time.perf_counter()
    result = run_search(cfg, progress=False, log=lambda line: (lines.append(line), print(line, flush=True)))
    elapsed = time.perf_counter() - started
    study = load_study(cfg.name, cfg.storage_url)
    records = [TrialRecord.from_trial(t) for t in complete_trials(study)]
    n = len(records)
    rounds = sum(float(m.group(1)) for line in lines if (m := re.search(r"round \d+/\d+ done in (\d+) s", line)))
    merge = sum(r.merge_s or 0 for r in records) / n
    evaluation = sum(r.eval_s or 0 for r in records) / n
    per_trial = result.wall_s / n
    after = plan_search(cfg).timing  # the probe again: the machine's load moves; the plan is the two's mean
    predicted = {part: (getattr(before, part) + getattr(after, part)) / 2 for part in PARTS}
    measured = {
        "merge": merge,
        "evaluation": evaluation,
        "refinement": rounds / n,
        "overhead": per_trial - merge - evaluation - rounds / n,
        "total": per_trial,
    }
    plan_parts = {**predicted, "total": sum(predicted.values())}
    return {
        "config": str(config),
        "n_trials": n,
        "params": plan.model.params,
        "speed": f"{before.speed.name}; after the run: {after.speed.name}",
        "probe_flops": (before.speed.probe + after.speed.probe) / 2,
        "plan": plan_parts,
        "measured": measured,
        "command_s": elapsed,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg()[0],
    }


@contextmanager
def constants(**values: float):
    """timing.py's module constants set to `values` for the block (the basis of a least-squares fit)."""
    from evomerge.capacity import timing

    saved = {name: getattr(timing, name) for name in values}
    for name, value in values.items():
        setattr(timing, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(timing, name, value)


def run_facts(run: dict):
    """(model facts, the refined tasks, trials, rounds, steps, CPUs) of a measured run's config, as its plan saw it."""
    from evomerge.capacity.plan import plan_search, refined_tasks
    from evomerge.config.schema import load_config

    cfg = load_config(Path(run["config"]), n_trials=run["n_trials"])
    cfg = cfg.model_copy(update={"early_stop": None, "portfolio": False})
    plan = plan_search(cfg)
    n = run["n_trials"]
    rounds, steps = (len(cfg.refine.starts(n)), cfg.refine.schedule(n)[0]) if cfg.refine is not None else (0, 0)
    return plan.model, refined_tasks(plan, cfg), n, rounds, steps, cfg.workers.num_cpus


def part_of(facts, rate: float, part: str, **values: float) -> float:
    from evomerge.capacity import timing

    model, tasks, n, rounds, steps, cpus = facts
    with constants(**values):
        return getattr(timing.trial_time(model, tasks, timing.speed_at(rate, cpus), n, rounds, steps), part)


def nonneg_lstsq(rows: list[list[float]], target: list[float]) -> list[float]:
    """Least squares with every unknown >= 0: the best of the unconstrained solutions over subsets of unknowns."""
    import itertools

    import numpy as np

    a, b = np.array(rows), np.array(target)
    best, best_err = [0.0] * a.shape[1], float(np.sum(b**2))
    for k in range(1, a.shape[1] + 1):
        for keep in itertools.combinations(range(a.shape[1]), k):
            x = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
            err = float(np.sum((a[:, keep] @ x - b) ** 2))
            if (x >= 0).all() and err < best_err - 1e-15:
                best, best_err = [0.0] * a.shape[1], err
                for i, v in zip(keep, x):
                    best[i] = float(v)
    return best


def relative(rows: list[list[float]], target: list[float]) -> tuple[list[list[float]], list[float]]:
    """Each run's equation divided by its measured seconds: the fit minimizes relative errors, so the zoo's
    fractions of a second weigh as much as the 135M model's tens of seconds."""
    return [[v / max(t, 1e-9) for v in row] for row, t in zip(rows, target)], [1.0] * len(target)


def fit(runs: list[dict]) -> dict[str, float]:
    """timing.py's CPU constants from measured runs: the merge's (bytes/s, per tensor), then the evaluation's (MFU,
    per request, per generation step) and the refinement's (MFU, per tensor) with the merge's fitted, the
    overhead's the mean."""
    facts = [run_facts(run) for run in runs]
    rates = [run["probe_flops"] for run in runs]
    inf, out = float("inf"), {}

    def solve(part: str, basis: list[dict], fixed: dict, names: list[str], invert: set[str]) -> None:
        base = [
            part_of(f, r, part, **fixed, **{k: v for b in basis for k, v in b["zero"].items()})
            for f, r in zip(facts, rates)
        ]
        rows = [[part_of(f, r, part, **fixed, **b["unit"]) - z for b in basis] for f, r, z in zip(facts, rates, base)]
        target = [run["measured"][part] - z for run, z in zip(runs, base)]
        x = nonneg_lstsq(*relative(rows, target))
        for name, v in zip(names, x):
            out[name] = (1 / v if v > 0 else inf) if name in invert else v

    zero_merge = {"CPU_MERGE_BYTES_S": inf, "TENSOR_S": 0.0}
    solve(
        "merge",
        [
            {"unit": {**zero_merge, "CPU_MERGE_BYTES_S": 1.0}, "zero": zero_merge},
            {"unit": {**zero_merge, "TENSOR_S": 1.0}, "zero": zero_merge},
        ],
        {},
        ["CPU_MERGE_BYTES_S", "TENSOR_S"],
        {"CPU_MERGE_BYTES_S"},
    )
    zero_eval = {"EVAL_MFU": inf, "REQUEST_S": 0.0, "GEN_STEP_S": 0.0, "CPU_MERGE_BYTES_S": inf}
    solve(
        "evaluation",
        [{"unit": {**zero_eval, k: 1.0}, "zero": zero_eval} for k in ("EVAL_MFU", "REQUEST_S", "GEN_STEP_S")],
        {},
        ["EVAL_MFU", "REQUEST_S", "GEN_STEP_S"],
        {"EVAL_MFU"},
    )
    merge = {"CPU_MERGE_BYTES_S": out["CPU_MERGE_BYTES_S"], "TENSOR_S": out["TENSOR_S"]}
    zero_refine = {"REFINE_MFU": inf, "REFINE_TENSOR_S": 0.0}
    solve(
        "refinement",
        [{"unit": {**zero_refine, k: 1.0}, "zero": zero_refine} for k in ("REFINE_MFU", "REFINE_TENSOR_S")],
        merge,
        ["REFINE_MFU", "REFINE_TENSOR_S"],
        {"REFINE_MFU"},
    )
    host = [part_of(f, r, "overhead", TRIAL_OVERHEAD_S=1.0) for f, r in zip(facts, rates)]
    out["TRIAL_OVERHEAD_S"] = sum(run["measured"]["overhead"] / h for run, h in zip(runs, host)) / len(runs)
    return out


def report_fit(fitted: dict[str, float], runs: list[dict], label: str) -> None:
    for run in runs:
        facts = run_facts(run)
        plan = {p: part_of(facts, run["probe_flops"], p, **fitted) for p in (*PARTS, "total")}
        cells = " / ".join(f"{plan[p]:.3g}" for p in PARTS)
        measured = " / ".join(f"{run['measured'][p]:.3g}" for p in PARTS)
        total = run["measured"]["total"]
        print(
            f"{label} {Path(run['config']).name} x{run['n_trials']}: plan {cells} = {plan['total']:.3g} s; measured "
            f"{measured} = {total:.3g} s; plan/measured {plan['total'] / total:.2f}"
        )


def with_probe(run: dict) -> dict:
    """The run with `probe_flops` (older runs' JSON has the probe only in `speed`'s words: their mean)."""
    if "probe_flops" not in run:
        rates = [float(r) * 1e9 for r in re.findall(r"probe (\d+) GFLOP/s", run["speed"])]
        run["probe_flops"] = sum(rates) / len(rates)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--fit", type=Path, nargs="+", help="refit timing.py's constants from these runs' --json")
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="runs to check the fit on (not fitted)")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.fit:
        runs = [with_probe(json.loads(p.read_text())) for p in args.fit]
        checks = [with_probe(json.loads(p.read_text())) for p in args.check]
        fitted = fit(runs)
        print("fitted: " + ", ".join(f"{k} = {v:.4g}" for k, v in fitted.items()))
        report_fit(fitted, runs, "fit")
        report_fit(fitted, checks, "check")
        return 0
    out = measure(args.config.resolve(), args.n_trials)
    print(f"\n{out['config']}: {out['n_trials']} trials, {out['params'] / 1e6:.2f}M parameters, on {out['speed']}")
    print(f"measured {out['when']}, load average {out['load']:.1f}")
    print(f"{'part':<12}{'plan s':>10}{'measured s':>12}{'plan/measured':>15}")
    for part in ("merge", "evaluation", "refinement", "overhead", "total"):
        p, m = out["plan"][part], out["measured"][part]
        ratio = f"{p / m:.2f}" if m > 1e-4 else "-"
        print(f"{part:<12}{p:>10.3f}{m:>12.3f}{ratio:>15}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
