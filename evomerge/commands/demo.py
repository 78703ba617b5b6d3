"""`evomerge demo`: the zoo, a short search, export and the held-out report, end to end.

    evomerge demo                          # builds ./zoo if missing, runs configs/demo.yaml, exports, reports
    evomerge demo --n-trials 20            # a shorter search
"""
from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo", default="zoo", help="zoo folder; built when it has no zoo.json (default: ./zoo)")
    parser.add_argument("--config", default="configs/demo.yaml", help="search config (default: configs/demo.yaml)")
    parser.add_argument("--n-trials", type=int, default=None, help="override the config's budget")


def run(args: argparse.Namespace) -> int:
    import time

    from evomerge.commands.report import print_report
    from evomerge.config import load_config
    from evomerge.errors import ConfigError
    from evomerge.export import export_trial
    from evomerge.report import build_report
    from evomerge.search.driver import run_search
    from evomerge.zoo.build import build_zoo

    start = time.perf_counter()
    zoo = Path(args.zoo)
    if not (zoo / "zoo.json").is_file():
        print(f"== building the demo zoo in {zoo}")
        build_zoo(zoo)
    else:
        print(f"== using the zoo in {zoo} (delete it to rebuild)")
    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: no such search config; run `evomerge demo` from the repository root or pass --config")
    cfg = load_config(args.config, n_trials=args.n_trials)
    print(f"== searching: {cfg.name}, {cfg.method}, {cfg.budget.n_trials} trials")
    run_search(cfg)
    print("== exporting the best trial")
    exported = export_trial(cfg.run_dir)
    print(f"   {exported}")
    print("== held-out report")
    result = build_report(cfg.run_dir)
    print_report(result)
    print(f"== done in {time.perf_counter() - start:.0f} s")
    return 0
