"""The time plan against a measured search: the seconds per trial the resource plan predicts, by part
(evomerge/capacity/timing.py), beside what a real search of the same config takes on this machine.

    .venv/bin/python bench/time_plan.py configs/demo.yaml --n-trials 30                  # the demo zoo
    .venv/bin/python bench/time_plan.py my_135m.yaml --n-trials 12 --json /tmp/t.json     # a real model

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
        "plan": plan_parts,
        "measured": measured,
        "command_s": elapsed,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
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
