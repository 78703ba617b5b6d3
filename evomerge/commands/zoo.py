"""`evomerge zoo build [--out DIR] [--seed N] [--size full|tiny]`"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="train the base and the specialists (deterministic on CPU)")
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
