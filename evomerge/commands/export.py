"""`evomerge export RUN_DIR [--out DIR] [--trial N] [--portable] [--kernels SET] [--hub-id LOCAL=org/name ...]`: recipe
YAML + checkpoint + model card of a trial (and of the best portable trial beside an evomerge-only one)."""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge export runs/demo                      # runs/demo/best/recipe.yaml + runs/demo/best/model/ (+ README.md)
  evomerge export runs/demo --trial 12 --out /tmp/t12
  evomerge export runs/demo --portable           # the best trial mergekit-yaml reproduces as the main recipe
  evomerge export runs/demo --out /tmp/demo-mk --kernels mergekit   # the same trial with mergekit's kernels
  evomerge export runs/demo --samples 5          # and best/samples.jsonl: 5 held-out examples per task, as scored
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
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="also keep OUT/samples.jsonl: the exported model's first N examples of each held-out task (tasks.heldout) "
        "as lm-eval scored them: prompt, response, reference, metrics (as `evomerge eval --samples`)",
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
    from evomerge.export.export import export_trial

    if args.samples < 0:
        raise ConfigError(f"--samples must be 0 or more, got {args.samples}")
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
    if args.samples:
        print(f"held-out samples written to {keep_samples(args.run_dir, res.model_dir, args.samples)}")
    if not res.heldout:
        print(f"the model card has no held-out scores: run `evomerge report {args.run_dir}`, then export again")
    return 0


def keep_samples(run_dir: str, model_dir, n: int):
    """The exported checkpoint scored on the run's held-out tasks, its first `n` examples of each written beside
    it as `samples.jsonl` (one JSON object per example); the file's path."""
    import json
    from pathlib import Path

    from evomerge.config.schema import load_run_config
    from evomerge.errors import ConfigError
    from evomerge.io.atomic import write_file_atomic
    from evomerge.scoring import TaskSpec, sample_model_dir
    from evomerge.scoring.scorer import EVERY_METRIC

    cfg = load_run_config(run_dir)
    if not cfg.tasks.heldout:
        raise ConfigError(f"{run_dir}: --samples scores the held-out tasks, and tasks.heldout is empty; list them")
    specs = [TaskSpec(name=name, metric=EVERY_METRIC) for name in cfg.tasks.heldout]
    paths = [str(p) for p in cfg.tasks.include_paths]
    defaults = cfg.tasks.include_defaults
    _, samples = sample_model_dir(model_dir, specs, n, paths, seed=cfg.seed, include_defaults=defaults)
    out = Path(model_dir).parent / "samples.jsonl"
    write_file_atomic(out, "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples))
    return out
