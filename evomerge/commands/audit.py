"""`evomerge audit CONFIG_OR_RECIPE.yaml [--plot FILE.png] [--json]`: pre-flight before a search.

Checks the models are compatible (architecture, tensor names and shapes, tokenizer vocab), then prints
per-layer task-vector similarity, sign-conflict rates and delta sizes, and where interference concentrates.
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a recipe YAML (has merge_method) or a search config (base_model + models)")
    parser.add_argument("--plot", metavar="FILE.png", help="also write a heatmap of the statistics")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON instead of a table")
    parser.add_argument("--sample", type=int, default=100_000, metavar="N",
                        help="positions per tensor for Spearman (seeded; default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Spearman sample (default 0)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from evomerge.audit import audit_dirs, format_table, load_inputs, summary
    from evomerge.errors import ConfigError

    if args.sample < 2:
        raise ConfigError(f"--sample {args.sample}: use at least 2 positions per tensor")
    base, models = load_inputs(args.config)
    if len(models) < 2:
        raise ConfigError(f"{args.config}: audit compares task vectors, so it needs at least two models besides "
                          f"the base (found {len(models)}); list them under `models`")
    progress = _progress() if sys.stderr.isatty() and not args.json else None
    report = audit_dirs(base, models, sample=args.sample, seed=args.seed, progress=progress)
    if args.plot:
        from evomerge.plots.audit import plot_audit

        plot_audit(report, args.plot)
    if args.json:
        print(json.dumps({**report.model_dump(mode="json"), "summary": summary(report)}, indent=2))
        return 0
    print(f"compatible: {report.base} + {', '.join(report.models)}: same architecture, {report.n_tensors} tensors "
          f"with matching names and shapes, same tokenizer vocab ({report.n_params:,} parameters)")
    print()
    print(format_table(report))
    print()
    for line in summary(report):
        print(line)
    if args.plot:
        print(f"\nheatmap written to {args.plot}")
    return 0


def _progress():
    import sys

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\raudit: {done}/{total} tensors", end=end, file=sys.stderr, flush=True)

    return show
