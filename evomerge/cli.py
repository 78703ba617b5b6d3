"""The `evomerge` command: parse, call one library function per subcommand, print.

Each subcommand lives in `evomerge/commands/<name>.py` with `configure(parser)` and `run(args) -> int`;
heavy imports stay inside `run`, so `evomerge --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from evomerge import __version__
from evomerge.errors import EvomergeError

# name -> one-line help; the module evomerge.commands.<name> implements it
COMMANDS = {
    "zoo": "build the demo model zoo (base + specialists) and its eval tasks",
    "merge": "materialize any recipe (mergekit YAML accepted) to an HF checkpoint",
    "audit": "pre-flight: compatibility, per-layer task-vector similarity and sign conflicts",
    "eval": "lm-eval scores of one checkpoint",
    "search": "run, or resume, a recipe search",
    "status": "trials, best so far, what is running",
    "export": "recipe YAML + checkpoint + model card of the best (or a chosen) trial",
    "verify": "check an exported checkpoint against the sha256 recorded in its recipe",
    "report": "plots and the held-out comparison table",
    "demo": "zoo, a short search, export and report, end to end",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary merge-recipe optimizer.")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"evomerge.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from evomerge.offline import go_offline
    from evomerge.threads import configure_process

    go_offline()
    configure_process()  # before torch loads OpenMP: idle threads sleep, one thread per CPU given
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
