"""`evomerge search CONFIG.yaml [--n-trials N] [--storage URL] [--workers K] [--force]`: run, or resume, a study."""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge search configs/demo.yaml                  # new study runs/demo (relative to this folder), or resume it
  evomerge search configs/demo.yaml --n-trials 150   # raise the budget of a finished study and go on
  evomerge search configs/demo.yaml --no-progress    # a line every tenth of the budget instead of a bar (logs)
  evomerge search configs/demo.yaml --workers 0      # no Ray: one worker in this process (debugging, pdb)
Stopped by Ctrl-C, SIGTERM or budget.timeout, the same command resumes it.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="search config YAML (see configs/demo.yaml)")
    parser.add_argument(
        "--n-trials",
        type=int,
        default=None,
        metavar="N",
        help="COMPLETE trials to end with (overrides budget.n_trials)",
    )
    parser.add_argument(
        "--storage", default=None, metavar="URL", help="Optuna RDB URL (default: sqlite:///runs/<name>/study.db)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="K",
        help="parallel workers (overrides workers.count); 0: one in this process, without Ray (debugging)",
    )
    parser.add_argument("--force", action="store_true", help="delete a study of the same name made with another config")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar: a line every tenth of the budget instead"
    )


def run(args: argparse.Namespace) -> int:
    from evomerge.config.schema import load_config
    from evomerge.errors import ConfigError
    from evomerge.run.driver import run_search

    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials must be at least 1, got {args.n_trials}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 (one worker in this process, no Ray) or more, got {args.workers}")
    cfg = load_config(args.config, n_trials=args.n_trials, storage=args.storage, workers=args.workers)
    run_search(cfg, force=args.force, progress=not args.no_progress)
    return 0
