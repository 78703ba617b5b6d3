"""`evomerge eval MODEL_DIR --tasks A,B`: lm-eval scores of one checkpoint, as a table or JSON.

evomerge eval zoo/add --tasks zoo_add,zoo_reverse
evomerge eval runs/demo/best/model --tasks zoo --json          # a tag: every skill's held-out task
evomerge eval MODEL --tasks my_task --include-path my_tasks/ --limit-subset 50
evomerge eval zoo/add --tasks zoo_add_greedy --samples 3     # and 3 examples per task: prompt, response, reference
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
  evomerge eval zoo/add --tasks zoo_add,zoo_reverse
  evomerge eval runs/demo/best/model --tasks zoo --json       # a tag: every skill's held-out task
  evomerge eval zoo/add --tasks zoo_add_search --limit-subset 50
  evomerge eval zoo/add --tasks zoo_add_greedy --samples 3    # and 3 examples per task: prompt, response, reference
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
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="also print the first N examples of each task: the prompt, the model's response and the reference "
        "(lm-eval's logged samples; with --json, under `samples`)",
    )


def run(args: argparse.Namespace) -> int:
    from evomerge.errors import TaskError
    from evomerge.scoring import TaskSpec, evaluate_model_dir, sample_model_dir
    from evomerge.scoring.scorer import EVERY_METRIC
    from evomerge.tables import text_table

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise TaskError("--tasks is empty; name at least one task, e.g. --tasks zoo_add,zoo_reverse")
    if args.limit_subset is not None and args.limit_subset < 1:
        raise TaskError(f"--limit-subset must be at least 1, got {args.limit_subset}")
    if args.samples < 0:
        raise TaskError(f"--samples must be 0 or more, got {args.samples}")
    specs = [TaskSpec(name=n, subset=args.limit_subset, metric=EVERY_METRIC) for n in names]  # every metric printed
    options = dict(
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        include_defaults=args.include_defaults,
    )
    samples: list[dict] = []
    if args.samples:
        scores, samples = sample_model_dir(args.model_dir, specs, args.samples, args.include_path, **options)
    else:
        scores = evaluate_model_dir(args.model_dir, specs, args.include_path, **options)
    rows = [[task, metric, f"{value:.4f}"] for task, metrics in scores.items() for metric, value in metrics.items()]
    if args.json:
        print(json.dumps({**scores, "samples": samples} if args.samples else scores, indent=2, sort_keys=True))
        return 0
    print(text_table(["task", "metric", "value"], rows))
    for sample in samples:
        print(format_sample(sample))
    return 0


def format_sample(sample: dict) -> str:
    """One example for a reader: its task and index, then the prompt, the response and the reference, each on its
    own lines (indented; a prompt's own newlines kept)."""

    def block(text: object) -> str:
        return "\n".join(f"    {line}" for line in str(text).splitlines() or [""])

    metrics = ", ".join(f"{k} {v:g}" for k, v in sample.items() if k not in _SAMPLE_TEXT and isinstance(v, float | int))
    return (
        f"\n{sample['task']} example {sample['doc_id']} ({metrics})\n  prompt:\n{block(sample['prompt'])}\n"
        f"  response:\n{block(sample['response'])}\n  reference:\n{block(sample['reference'])}"
    )


_SAMPLE_TEXT = ("task", "doc_id", "prompt", "response", "reference")
