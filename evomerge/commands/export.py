"""`evomerge export RUN_DIR [--out DIR] [--trial N]`: recipe YAML + checkpoint + model card of a trial."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (runs/<name>) made by `evomerge search`")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/best)")
    parser.add_argument("--trial", type=int, default=None, help="trial number (default: the best; a Pareto point for nsga2)")


def run(args: argparse.Namespace) -> int:
    from evomerge.export import export_trial

    res = export_trial(args.run_dir, out=args.out, trial=args.trial)
    print(f"trial {res.trial} (objective {res.objective:.4f}): {res.recipe} and {res.model_dir}")
    return 0
