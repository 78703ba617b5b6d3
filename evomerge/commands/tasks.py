"""`evomerge tasks split FILE.jsonl --name NAME --out DIR`: your own examples as three disjoint lm-eval tasks
(search, validation, held-out), ready for `--include-path DIR` and a search config's `tasks.include_paths`."""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge tasks split data/mine.jsonl --name mine --out my_tasks                   # generation, exact match
  evomerge tasks split data/mine.jsonl --name mine_mc --out my_tasks --kind choice  # multiple choice
  evomerge tasks split qa.jsonl --name qa --out my_tasks --prompt question --answer gold --sizes 200,100,rest
"""


def configure(parser: argparse.ArgumentParser) -> None:
    from evomerge import tasksplit

    sub = parser.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    split = sub.add_parser(
        "split",
        help="three disjoint lm-eval tasks (search, validation, held-out) from a JSONL of your examples",
        description=tasksplit.__doc__,
        epilog=f"examples:\n{EXAMPLES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasksplit.configure(split)


def run(args: argparse.Namespace) -> int:
    from evomerge import tasksplit

    return tasksplit.run(args)
