"""`evomerge demo`: the zoo, a short search, the held-out report and the export, end to end.

evomerge demo                          # builds ./zoo if missing, runs configs/demo.yaml, reports, exports
evomerge demo --n-trials 20            # a shorter search
evomerge demo --zoo /data/zoo          # the models of another zoo folder (whatever the config names)
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
  evomerge demo                          # ./zoo (built if missing), configs/demo.yaml, report, export
  evomerge demo --n-trials 20            # a shorter search
  evomerge demo --zoo /data/zoo          # a zoo elsewhere: the search merges its models
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--zoo",
        default="zoo",
        metavar="DIR",
        help="zoo folder: the search merges its base and specialists; built when it has no zoo.json (default: ./zoo)",
    )
    parser.add_argument("--config", default="configs/demo.yaml", help="search config (default: configs/demo.yaml)")
    parser.add_argument(
        "--n-trials",
        type=int,
        default=None,
        metavar="N",
        help="COMPLETE trials to end with (default: the config's budget.n_trials)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    from evomerge.commands.report import print_report
    from evomerge.errors import ConfigError
    from evomerge.export.export import export_trial
    from evomerge.report import build_report
    from evomerge.run.driver import run_search
    from evomerge.zoo.build import build_zoo

    start = time.perf_counter()
    zoo = Path(args.zoo)
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials must be at least 1, got {args.n_trials}")
    if not Path(args.config).is_file():
        raise ConfigError(
            f"{args.config}: no such search config; run `evomerge demo` from the repository root or pass --config"
        )
    if not (zoo / "zoo.json").is_file():
        print(f"== building the demo zoo in {zoo} (a few minutes)")
        build_zoo(zoo)
    else:
        print(f"== using the zoo in {zoo} (delete it to rebuild)")
    cfg = demo_config(args.config, zoo, args.n_trials)
    print(
        f"== searching: {cfg.name}, {cfg.method} over {zoo.name}/{{{', '.join(p.name for p in cfg.models)}}}, "
        f"{cfg.budget.n_trials} trials"
    )
    run_search(cfg)
    # the report first: it scores the exported trial on held-out data, which the model card then shows
    print("== held-out report")
    result = build_report(cfg.run_dir)
    print_report(result)
    print("== exporting the best trial")
    print(f"   {export_trial(cfg.run_dir)}")
    print(f"== done in {time.perf_counter() - start:.0f} s")
    return 0


def demo_config(config: str | Path, zoo: Path, n_trials: int | None = None):
    """The demo's search config with its models taken from `zoo` (its zoo.json: the base and the specialists),
    whatever folder the config file names, so `--zoo DIR` searches DIR's models."""
    import json

    from evomerge.config.schema import apply_overrides, parse_config
    from evomerge.io.yamlfile import read_yaml

    manifest = json.loads((zoo / "zoo.json").read_text())
    data = read_yaml(Path(config), "config file")
    if isinstance(data, dict):  # anything else: parse_config names the problem
        data = {
            **data,
            "base_model": str((zoo / manifest["base"]).resolve()),
            "models": [str((zoo / name).resolve()) for name in manifest["specialists"]],
        }
    cfg = parse_config(data, source=str(config), base_dir=Path(config).parent)
    return apply_overrides(cfg, n_trials=n_trials)
