"""`evomerge export RUN_DIR [--out DIR] [--trial N] [--portable] [--kernels SET] [--hub-id LOCAL=org/name ...]`: recipe
YAML + checkpoint + model card of a trial (and of the best portable trial beside an evomerge-only one)."""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge export runs/demo                      # runs/demo/best/recipe.yaml + runs/demo/best/model/ (+ README.md)
  evomerge export runs/demo --trial 12 --out /tmp/t12
  evomerge export runs/demo --portable           # the best trial mergekit-yaml reproduces as the main recipe
  evomerge export runs/demo --out /tmp/demo-mk --kernels mergekit   # the same trial with mergekit's kernels
  evomerge export runs/demo --hub-id zoo/base=me/tiny-base --hub-id zoo/add=me/tiny-add --hub-id zoo/reverse=me/tiny-rev
Run `evomerge report RUN_DIR` first to put held-out scores (and caveats) in the model card.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<name>) made by `evomerge search`")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/best)")
    parser.add_argument(
        "--trial",
        type=int,
        default=None,
        metavar="N",
        help="trial number (default: the one `evomerge status` names: best on validation, else the "
        "best search objective; for nsga2 any Pareto point)",
    )
    parser.add_argument(
        "--portable",
        action="store_true",
        help="when the exported trial is evomerge-only, make the best portable trial (one mergekit-yaml reproduces) "
        "the main recipe, and write the evomerge-only one to OUT/evomerge-only/ (default: the evomerge-only one is the "
        "main recipe and the portable one goes to OUT/portable/)",
    )
    parser.add_argument(
        "--kernels",
        default=None,
        metavar="SET",
        help="merge with this kernel set instead of the one the trial was scored with "
        "(mergekit-0.1.5 for mergekit's exact bytes)",
    )
    parser.add_argument(
        "--hub-id",
        action="append",
        default=[],
        metavar="LOCAL=org/name",
        help="publish the input model folder LOCAL as the Hugging Face Hub id org/name: the recipe and "
        "the model card's base_model name it so (its sha256 is kept); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    from evomerge.commands.merge import kernels_flag
    from evomerge.errors import ConfigError
    from evomerge.export import export_trial

    kernels = kernels_flag(args.kernels) if args.kernels is not None else None
    hub_ids = {}
    for pair in args.hub_id:
        local, sep, hub = pair.partition("=")
        if not sep or not local or not hub:
            raise ConfigError(f"--hub-id {pair}: write LOCAL=org/name, e.g. --hub-id zoo/add=me/tiny-add")
        hub_ids[local] = hub
    res = export_trial(
        args.run_dir, out=args.out, trial=args.trial, hub_ids=hub_ids, kernels=kernels, portable=args.portable
    )
    print(res)
    if not res.heldout:
        print(f"the model card has no held-out scores: run `evomerge report {args.run_dir}`, then export again")
    return 0
