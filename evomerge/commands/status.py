"""`evomerge status RUN_DIR`: trial counts, the exported trial, best trials with per-task scores, failures, what is
running."""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge status runs/demo                  # counts, the exported trial (marked *), the best trials, failures
  evomerge status runs/demo --top 20 | less
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<name>) made by `evomerge search`")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="how many best trials to list (default: 5)")


def run(args: argparse.Namespace) -> int:
    from evomerge.report.status import status_text

    print(status_text(args.run_dir, top=args.top))
    return 0
