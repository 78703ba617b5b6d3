"""`evomerge audit CONFIG_OR_RECIPE.yaml [--plot FILE.png] [--json] [--probe] [--plan]`: pre-flight before a search.

Checks the models are compatible (architecture, tensor names and shapes, tokenizer vocab), then prints
per-layer task-vector similarity, sign-conflict rates and delta sizes, and where interference concentrates.
`--probe` (search configs) also merges and scores, region by region, where one model's task vector hurts
another model's task (`evomerge.analysis.probe`). `--plan` (search configs) prints only the resource plan
`evomerge search` prints at start (`evomerge.capacity`): memory, and time per trial by part, trials per hour and the
night's end, for this machine or one described by `--host-memory`, `--gpus`, `--cpus`, `--nodes` and `--gpu-kind`
(`--model-config`: from a config.json alone), and exits 2 naming the setting to change when the search cannot fit.
"""

from __future__ import annotations

import argparse
import contextlib

EXAMPLES = """\
  evomerge audit configs/demo.yaml --plot /tmp/audit.png      # statistics per layer and tensor kind, and a heatmap
  evomerge audit configs/demo.yaml --probe --probe-subset 100 # also merge and score: where do the skills collide?
  evomerge audit runs/demo/best/recipe.yaml --json            # a recipe's inputs, as JSON
  evomerge audit configs/demo.yaml --plan                     # the resource plan on this machine (no weight read)
  evomerge audit configs/demo.yaml --plan --gpus 8x80G --host-memory 1T   # ... on an 8-GPU node
  evomerge audit configs/7b-8gpus.yaml --plan --model-config configs/llama-2-7b.config.json --gpus 8x80G --cpus 96
                                                               # a 7B night from its config.json: memory and time
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a recipe YAML (has merge_method) or a search config (base_model + models)")
    parser.add_argument("--plot", metavar="FILE.png", help="also write a heatmap of the statistics")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON instead of a table")
    parser.add_argument(
        "--sample",
        type=int,
        default=100_000,
        metavar="N",
        help="positions per tensor for Spearman (seeded; default 100000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Spearman sample (default 0)")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also merge and score, per layer and tensor kind, where one model's task vector hurts "
        "another's task (needs a search config: its tasks.search)",
    )
    parser.add_argument(
        "--allow-config-mismatch",
        action="store_true",
        help="audit models whose config.json differ in shape-defining fields when their tensors match",
    )
    plan = parser.add_argument_group("resource plan (--plan)")
    plan.add_argument(
        "--plan",
        action="store_true",
        help="print only the resource plan of a search config (memory per worker and node against the devices; "
        "reads the weights' headers, not the weights) and exit 2 when it cannot fit",
    )
    plan.add_argument("--host-memory", metavar="SIZE", help="plan for nodes with this much free host memory (512G)")
    plan.add_argument("--gpus", metavar="NxSIZE", help="plan for nodes with N GPUs of SIZE free each (8x80G; 0: none)")
    plan.add_argument("--nodes", type=int, default=None, metavar="K", help="plan for K such nodes (default 1)")
    plan.add_argument("--cpus", type=float, metavar="N", help="plan for nodes with N CPUs each (default: not checked)")
    plan.add_argument(
        "--gpu-kind",
        metavar="NAME",
        help="the GPUs' kind the time plan assumes: H100, H200, A100, L40S, A10G or L4 (default: this machine's, "
        "else H100)",
    )
    plan.add_argument(
        "--model-config",
        metavar="CONFIG.json",
        help="plan from this config.json alone, for every input (the weights need not be on this machine; a "
        "tokenizer.json beside it counts the tasks' tokens, else about 4 characters a token)",
    )
    parser.add_argument(
        "--probe-subset",
        type=int,
        metavar="N",
        help="examples per task for --probe (default: each search task's own subset)",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from evomerge.analysis.audit import audit_dirs, load_inputs
    from evomerge.errors import ConfigError

    if args.plan:
        return _plan(args)
    _no_plan_flags(args)
    if args.sample < 2:
        raise ConfigError(f"--sample {args.sample}: use at least 2 positions per tensor")
    cfg = _probe_config(args) if args.probe else None
    base, models = load_inputs(args.config)
    args.allow_config_mismatch = args.allow_config_mismatch or _config_allows(args.config)
    if len(models) < 2:
        raise ConfigError(
            f"{args.config}: audit compares task vectors, so it needs at least two models besides "
            f"the base (found {len(models)}); list them under `models`"
        )
    with _progress(enabled=sys.stderr.isatty() and not args.json) as progress:
        report = audit_dirs(
            base,
            models,
            sample=args.sample,
            seed=args.seed,
            progress=progress,
            allow_config_mismatch=args.allow_config_mismatch,
        )
    probed = _probe(cfg, args, sys.stderr.isatty() and not args.json) if cfg is not None else None
    if args.plot:
        from evomerge.analysis.heatmap import plot_audit

        plot_audit(report, args.plot)
    if args.json:
        _print_json(report, probed)
    else:
        _print_text(report, probed, args.plot)
    return 0


def _print_json(report, probed) -> None:
    import json

    from evomerge.analysis.audit import summary

    out = {**report.model_dump(mode="json"), "summary": summary(report)}
    if probed is not None:
        from evomerge.analysis.probe import probe_summary

        out["probe"] = {**probed.to_dict(), "summary": probe_summary(probed)}
    print(json.dumps(out, indent=2))


def _print_text(report, probed, plot) -> None:
    from evomerge.analysis.audit import format_table, summary

    names = f"{report.base} + {', '.join(report.models)}: same architecture, {report.n_tensors} tensors"
    if report.vocabulary:
        print(
            f"compatible: {names} with matching names and shapes but for the vocabulary rows "
            f"({report.n_params:,} parameters); the vocabularies differ:"
        )
        for line in report.vocabulary:
            print(f"  {line}")
        print(
            "  A merge of these models needs tokenizer_source (union: every model's tokens; base: the base's; or a "
            "model folder); below, embeddings and head are compared over the base's tokens."
        )
    else:
        print(
            f"compatible: {names} with matching names and shapes, same tokenizer vocab ({report.n_params:,} parameters)"
        )
    print()
    print(format_table(report))
    print()
    for line in summary(report):
        print(line)
    if probed is not None:
        from evomerge.analysis.probe import format_probe, probe_summary

        print()
        print(format_probe(probed))
        print()
        for line in probe_summary(probed):
            print(line)
    if plot:
        print(f"\nheatmap written to {plot}")


@contextlib.contextmanager
def _progress(enabled: bool):
    """A tqdm bar on stderr fed by the audit's `progress(done, total)` calls."""
    import sys

    from tqdm.auto import tqdm

    bar = tqdm(desc="audit", unit="tensor", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def show(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield show
    finally:
        bar.close()


def _probe_config(args: argparse.Namespace):
    """The search config --probe takes its tasks from (checked before any work: errors exit 2 at once)."""
    from evomerge.errors import ConfigError

    if args.probe_subset is not None and args.probe_subset < 1:
        raise ConfigError(f"--probe-subset {args.probe_subset}: use at least 1 example per task")
    return _search_config(args.config, "--probe")


def _model_config(path: str, cfg):
    """(ModelFacts, tokenizer folder or None) of a config.json given for every input of `cfg`."""
    import json
    from pathlib import Path

    from evomerge.capacity import ModelFacts
    from evomerge.errors import ConfigError

    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"--model-config {path}: not a readable config.json ({err}); pass a model's config.json"
        ) from None
    if not isinstance(config, dict) or not config.get("hidden_size"):
        raise ConfigError(f"--model-config {path}: no hidden_size; pass a model's config.json (a transformers one)")
    folder = Path(path).parent
    tokenizer = str(folder) if (folder / "tokenizer.json").is_file() else None
    return ModelFacts.of_config(config, n_inputs=1 + len(cfg.models), dtype=cfg.dtype), tokenizer


def _search_config(path: str, flag: str, check_files: bool = True):
    """A search config for `flag` (a recipe is refused: --probe and --plan need a search's tasks and workers).
    `check_files=False`: its model folders need not exist (a plan from --model-config)."""
    from evomerge.config.schema import load_config
    from evomerge.errors import ConfigError
    from evomerge.io.yamlfile import read_yaml

    raw = read_yaml(path, "file (pass a search config YAML)")
    if isinstance(raw, dict) and "merge_method" in raw:
        raise ConfigError(
            f"{path}: {flag} needs a search config's `tasks.search` and `workers`, and this "
            f"is a recipe; pass the search config (e.g. configs/demo.yaml) or drop {flag}"
        )
    return load_config(path, check_files=check_files)


def _config_allows(path: str) -> bool:
    """Whether a search config sets `allow_config_mismatch: true` (audit then honours it as the search does)."""
    from evomerge.io.yamlfile import read_yaml

    raw = read_yaml(path, "file (pass a recipe or search config YAML)")
    return isinstance(raw, dict) and raw.get("allow_config_mismatch") is True


def _probe(cfg, args: argparse.Namespace, show: bool):
    import sys

    from evomerge.analysis.probe import probe
    from evomerge.scoring import TaskSpec

    tasks = [
        TaskSpec(**{**t.model_dump(), **({"subset": args.probe_subset} if args.probe_subset else {})})
        for t in cfg.tasks.search
    ]
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if show else None
    return probe(
        cfg.base_model,
        cfg.models,
        tasks,
        cfg.tasks.include_paths,
        seed=cfg.seed,
        log=log,
        include_defaults=cfg.tasks.include_defaults,
        allow_config_mismatch=args.allow_config_mismatch,
        tokenizer_source=cfg.tokenizer_source,
    )


def _no_plan_flags(args: argparse.Namespace) -> None:
    """The machine flags describe the machine of a resource plan: without --plan they would be ignored in silence."""
    from evomerge.errors import ConfigError

    flags = (*PLAN_FLAGS, *OTHER_PLAN_FLAGS)
    given = [f"--{name.replace('_', '-')}" for name in flags if getattr(args, name, None) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)} describe{'s' * (len(given) == 1)} the machine of a resource plan, which only --plan "
            f"prints; add --plan (evomerge audit {args.config} --plan {' '.join(given)} ...) or drop "
            f"{'it' if len(given) == 1 else 'them'}"
        )


PLAN_FLAGS = ("host_memory", "gpus", "nodes", "cpus")  # the machine the plan is for
OTHER_PLAN_FLAGS = ("gpu_kind", "model_config")


def _plan(args: argparse.Namespace) -> int:
    """The resource plan of a search config, on this machine (or its Ray cluster) or the one the flags describe."""
    from evomerge.capacity import given_devices, plan_search
    from evomerge.config.resolve import resolve_config
    from evomerge.errors import ConfigError
    from evomerge.run.pool import cluster_of

    nodes = 1 if args.nodes is None else args.nodes
    if nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: plan for at least 1 node")
    if args.cpus is not None and args.cpus <= 0:
        raise ConfigError(f"--cpus {args.cpus:g}: give the CPUs of each node (e.g. --cpus 96)")
    cfg = _search_config(args.config, "--plan", check_files=args.model_config is None)
    model, tokenizer = _model_config(args.model_config, cfg) if args.model_config else (None, None)
    resolved = resolve_config(cfg)  # the config exactly as `search` runs it
    for line in resolved.notes:  # what the search switches off (refinement on slerp, say) is off here too
        print(line)
    cfg = resolved.config
    described = any(getattr(args, name) is not None for name in PLAN_FLAGS)
    devices = given_devices(args.host_memory, args.gpus, nodes, cpus=args.cpus) if described else None
    if devices is None and cfg.workers.address:
        devices = cluster_of(cfg)
    plan = plan_search(cfg, resolved.scorer, devices, model=model, gpu_kind=args.gpu_kind, tokenizer=tokenizer)
    print("\n".join(plan.lines()), flush=True)  # before the refusal's line on stderr
    plan.check()
    return 0
