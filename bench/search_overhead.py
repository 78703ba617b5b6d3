"""Per-trial time of a search on the tiny zoo: merge, eval, and everything else (sampler, Ray, storage).

    python bench/search_overhead.py [--zoo DIR] [--trials 20]

"Everything else" is, per trial, the worker's cycle (its idle wait for the driver + the whole call) minus
merge and eval; it is printed for a queue depth of 1 (ask after each tell) and 2 (the default: the next
trial already waits inside the worker while the driver tells and asks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    from evomerge.offline import go_offline

    go_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=None, help="a tiny zoo (default: build one in a temp dir)")
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()

    from evomerge.config.schema import parse_config
    from evomerge.run import pool as workers
    from evomerge.run.driver import run_search
    from evomerge.study.storage import load_study
    from evomerge.study.trials import complete_trials

    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    zoo = Path(args.zoo) if args.zoo else tmp / "zoo"
    if not args.zoo:
        from evomerge.zoo.build import build_zoo

        build_zoo(zoo, size="tiny", log=None)
    os.chdir(tmp)
    for depth in (1, 2):
        cfg = parse_config(
            {
                "name": f"depth{depth}",
                "base_model": str(zoo / "base"),
                "models": [str(zoo / "add"), str(zoo / "reverse")],
                "method": "ties",
                "search_space": "ties",
                "tasks": {
                    "search": [{"name": "zoo_add_search", "subset": 40}, {"name": "zoo_reverse_search", "subset": 40}]
                },
                "sampler": {"name": "cmaes"},
                "budget": {"n_trials": args.trials},
            }
        )
        res = run_search(cfg, progress=False, log=None, pool_factory=lambda c, d=depth: workers.WorkerPool(c, depth=d))
        trials = complete_trials(load_study(cfg.name, cfg.storage_url))[1:]  # the first trial warms up lm-eval
        med = lambda xs: statistics.median(xs)  # noqa: E731
        merge = med([t.user_attrs["merge_s"] for t in trials])
        ev = med([t.user_attrs["eval_s"] for t in trials])
        other = [t.user_attrs["total_s"] - t.user_attrs["merge_s"] - t.user_attrs["eval_s"] for t in trials]
        total = med([t.user_attrs["total_s"] for t in trials])
        busy = sum(t.user_attrs["merge_s"] + t.user_attrs["eval_s"] for t in trials)
        print(
            f"queue depth {depth}: per trial (median of {len(trials)}) merge {merge:.3f} s, eval {ev:.3f} s, "
            f"other {med(other):.3f} s ({med(other) / total:.1%} of {total:.3f} s); "
            f"run: {res.wall_s:.1f} s wall for {len(res.timings)} trials, merge+eval {busy / res.wall_s:.0%} of it"
        )


if __name__ == "__main__":
    main()
