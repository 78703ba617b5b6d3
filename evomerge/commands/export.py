"""`evomerge export RUN_DIR [--out DIR] [--trial N] [--kernels SET]`: recipe YAML + checkpoint + model card of a trial."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (runs/<name>) made by `evomerge search`")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/best)")
    parser.add_argument("--trial", type=int, default=None, help="trial number (default: the best; a Pareto point for nsga2)")
    parser.add_argument("--kernels", default=None, metavar="SET",
                        help="merge with this kernel set instead of the one the trial was scored with "
                             "(mergekit-0.1.5 for mergekit's exact bytes)")


def run(args: argparse.Namespace) -> int:
    from evomerge.commands.merge import kernels_flag
    from evomerge.export import export_trial

    kernels = kernels_flag(args.kernels) if args.kernels is not None else None
    res = export_trial(args.run_dir, out=args.out, trial=args.trial, kernels=kernels)
    print(f"trial {res.trial} (objective {res.objective:.4f}): {res.recipe} and {res.model_dir}")
    return 0
