"""`evomerge zoo build [--out DIR] [--seed N] [--size full|tiny]`"""
from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge zoo build --out zoo                 # the demo zoo: a few minutes on 2 CPU cores
  evomerge zoo build --out /tmp/tiny --size tiny   # the test suite's smaller zoo: seconds
"""
BUILD = (
    "train, on CPU and deterministically, the demo zoo: a tiny Llama-style base (hidden 64, 6 layers) on a mixture "
    "of character skills (copy, sort, shift, addition), then two specialists fine-tuned from it, `add` and "
    "`reverse`, each on its own skill with a replay of the base's mixture; writes OUT/{base,add,reverse} as "
    "safetensors checkpoints with one tokenizer and OUT/zoo.json (their sha256). It takes a few minutes on 2 idle "
    "CPU cores, longer on a busy machine (--size tiny: seconds). The skills' lm-eval tasks ship in eval_tasks/zoo/."
)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    import textwrap

    build = sub.add_parser("build", help="train the base and the specialists (deterministic on CPU, a few minutes)",
                           description=textwrap.fill(BUILD, 100), epilog=f"examples:\n{EXAMPLES}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    build.add_argument("--out", default="zoo", help="output folder (default: ./zoo)")
    build.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    build.add_argument("--size", default="full", choices=["full", "tiny"], help="full: the demo zoo; tiny: the test zoo")


def run(args: argparse.Namespace) -> int:
    import time

    from evomerge.zoo.build import build_zoo

    start = time.perf_counter()
    manifest = build_zoo(args.out, seed=args.seed, size=args.size)
    names = ", ".join(["base", *manifest["specialists"]])
    print(f"zoo written to {args.out} ({names}) in {time.perf_counter() - start:.0f} s")
    return 0
