"""The `evomerge` command: parse, call one library function per subcommand, print.

Each subcommand lives in `evomerge/commands/<name>.py` with `configure(parser)`, `run(args) -> int` and
`EXAMPLES` (shown at the end of its --help); heavy imports stay inside `run`, so `evomerge --help` is instant.
Ctrl-C and SIGTERM (a scheduler's time limit) stop any command the same way: one line, exit 128 + the signal.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from evomerge import __version__, interrupts
from evomerge.errors import EvomergeError, Interrupted

# name -> one-line help, in the order of a first session (zoo -> audit -> search -> status -> export -> report),
# then the tools around it; the module evomerge.commands.<name> implements each
COMMANDS = {
    "zoo": "build the demo model zoo (base + specialists) and its eval tasks",
    "audit": "pre-flight: compatibility, per-layer task-vector similarity and sign conflicts",
    "search": "run, or resume, a recipe search",
    "status": "trials, best so far, the trial export takes, what is running",
    "export": "recipe YAML + checkpoint + model card of the best (or a chosen) trial",
    "report": "plots and the held-out comparison table",
    "merge": "materialize any recipe (mergekit YAML accepted) to an HF checkpoint",
    "eval": "lm-eval scores of one checkpoint",
    "tasks": "your own examples as three disjoint lm-eval tasks (search, validation, held-out)",
    "verify": "check an exported checkpoint against the sha256 recorded in its recipe",
    "demo": "zoo, a short search, report and export, end to end",
}

WORKFLOW = """\
a first session, in order:
  evomerge zoo build --out zoo                   # the demo zoo: a base and two specialists (a few minutes)
  evomerge audit configs/demo.yaml               # can these models merge, and where do they interfere?
  evomerge search configs/demo.yaml              # the study: runs/demo/ (run it again to resume)
  evomerge status runs/demo                      # trials, the best so far, the trial export would take
  evomerge report runs/demo                      # held-out comparison against the sources and default merges
  evomerge export runs/demo                      # runs/demo/best/: recipe.yaml + model/ with its model card
or all of it: evomerge demo.  `evomerge COMMAND --help` shows each command's options and examples."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their line breaks; option help wraps as usual."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Evolutionary merge-recipe optimizer.", epilog=WORKFLOW, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"evomerge.commands.{name}")
        epilog = f"examples:\n{module.EXAMPLES.rstrip()}" if getattr(module, "EXAMPLES", "") else None
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, formatter_class=_Formatter)
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
    restore = interrupts.install()  # SIGINT and SIGTERM: Interrupted, never inside a database call
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, so a closed pipe is handled below rather than at exit
        return code
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        stop = exc if isinstance(exc, Interrupted) else Interrupted()
        print(
            f"evomerge: interrupted ({stop.signal_name})" + (f": {stop.detail}" if stop.detail else ""), file=sys.stderr
        )
        return stop.exit_code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # some other pipe: a bug, with its traceback
        _silence_stdout()  # `evomerge status runs/demo | head`: the reader has what it wanted
        return 128 + signal.SIGPIPE
    finally:
        restore()


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush finds no closed pipe to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
