"""`evomerge report RUN_DIR`: held-out comparison table, plain verdict and figures in RUN_DIR/report/.

evomerge report runs/demo
evomerge report runs/demo --top-k 5 --limit-subset 100      # faster: a fixed seeded sample per task
"""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge report runs/demo                                  # runs/demo/report/report.md + PNGs
  evomerge report runs/demo --top-k 5 --limit-subset 100     # faster: a fixed seeded sample per task
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<name>) made by `evomerge search`")
    parser.add_argument(
        "--top-k", type=int, default=3, metavar="K", help="best trials scored on held-out data (default 3)"
    )
    parser.add_argument(
        "--heldout",
        default=None,
        metavar="A,B",
        help="comma-separated held-out tasks (default: the config's tasks.heldout)",
    )
    parser.add_argument(
        "--limit-subset", type=int, metavar="N", help="score a fixed seeded sample of N examples per task"
    )


def run(args: argparse.Namespace) -> int:
    from evomerge.errors import ConfigError
    from evomerge.report import build_report

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.limit_subset is not None and args.limit_subset < 1:
        raise ConfigError(f"--limit-subset must be at least 1, got {args.limit_subset}")
    heldout = [t.strip() for t in args.heldout.split(",") if t.strip()] if args.heldout else None
    print_report(build_report(args.run_dir, top_k=args.top_k, heldout=heldout, subset=args.limit_subset))
    return 0


def print_report(result) -> None:
    """The report's path, its held-out table and the plain verdict (shared with `evomerge demo`)."""
    from evomerge.report import statement, text_comparison

    c = result.comparison
    metric = "/".join(sorted(set(c.metrics.values())))
    print(f"\nreport: {result.report}")
    print(f"held-out {metric}:\n")
    print(text_comparison(c))
    print("\n" + statement(c.verdict(), metric).replace("**", ""))
