"""`evomerge eval MODEL_DIR --tasks A,B`: lm-eval scores of one checkpoint, as a table or JSON.

evomerge eval zoo/add --tasks zoo_add,zoo_reverse
evomerge eval runs/demo/best/model --tasks zoo --json          # a tag: every skill's held-out task
evomerge eval MODEL --tasks my_task --include-path my_tasks/ --limit-subset 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
  evomerge eval zoo/add --tasks zoo_add,zoo_reverse
  evomerge eval runs/demo/best/model --tasks zoo --json       # a tag: every skill's held-out task
  evomerge eval zoo/add --tasks zoo_add_search --limit-subset 50
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="a local Hugging Face checkpoint folder")
    parser.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval tasks or tags (e.g. zoo_add,zoo_reverse)"
    )
    parser.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="extra folder of task YAMLs (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    parser.add_argument(
        "--limit-subset", type=int, metavar="N", help="score a fixed seeded sample of N examples per task"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit-subset sample (default 0)")
    parser.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="examples per forward pass (default 64)"
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    parser.add_argument("--include-defaults", action="store_true", help="also index lm-eval's built-in tasks (~30 s)")


def run(args: argparse.Namespace) -> int:
    from evomerge.errors import TaskError
    from evomerge.scoring import TaskSpec, evaluate_model_dir
    from evomerge.scoring.scorer import EVERY_METRIC
    from evomerge.tables import text_table

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise TaskError("--tasks is empty; name at least one task, e.g. --tasks zoo_add,zoo_reverse")
    if args.limit_subset is not None and args.limit_subset < 1:
        raise TaskError(f"--limit-subset must be at least 1, got {args.limit_subset}")
    specs = [TaskSpec(name=n, subset=args.limit_subset, metric=EVERY_METRIC) for n in names]  # every metric printed
    scores = evaluate_model_dir(
        args.model_dir,
        specs,
        args.include_path,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        include_defaults=args.include_defaults,
    )
    rows = [[task, metric, f"{value:.4f}"] for task, metrics in scores.items() for metric, value in metrics.items()]
    print(json.dumps(scores, indent=2, sort_keys=True) if args.json else text_table(["task", "metric", "value"], rows))
    return 0
