"""The projection table of docs/gpus.md and the README: per-trial seconds and memory of a search at 7B, 13B and 70B
on a GPU node, from the resource plan itself (evomerge/capacity): the same formulas `evomerge audit --plan
--model-config` prints.

    .venv/bin/python bench/projection.py                          # the table: 8 x H100 80 GB, 2 TB, 300 trials
    .venv/bin/python bench/projection.py --gpu-kind A100          # another GPU of capacity/timing.py's table
    .venv/bin/python bench/projection.py --method tsv_m           # a subspace method: its SVDs on one CPU thread
    .venv/bin/python bench/projection.py --h2d 25 --mfu 0.3       # bench/gpu_check.py's measured figures instead

A PROJECTION, not a measurement. Per size: a Llama-2 shape in bfloat16 (`ModelFacts.of_config`), a base and three
fine-tunes; the search tasks: `--requests` loglikelihood requests of `--tokens` tokens (`TaskFacts`); `--trials`
trials with the refinement rounds a default `refine:` block runs for that budget (`--steps` steps each), and the
portfolio's default merges, each priced by its own method. Memory: `evaluate_plan` (the fewest of 1, 2, 4, 8 GPUs
per worker on which a worker fits with refinement); time: `timing.gpu_speed` and `timing.trial_time` (the formulas
are in evomerge/capacity/timing.py's docstring and docs/gpus.md, "How long: the time plan").

Flags of the older projection, which had a time formula of its own: `--h2d` (host-to-device GB/s per GPU),
`--tflops` (the GPU's dense bf16 TFLOP/s) and `--mfu` (their utilisation) now replace the time plan's figures for
the kind (`--gpu-kind`); `--trials` is the budget (it was trials per refinement round: the rounds are now the
default schedule's for the budget). Dropped, because the time plan has no such term: `--merge-x` (a merge is its
bytes over the bandwidth plus a fixed cost per tensor), `--lm-eval-s` (lm-eval's host cost is per request) and
`--overhead` / `--scale` (the overhead per trial is the plan's).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama-2's config.json fields
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}  # fmt: skip


def model_facts(name: str):
    from evomerge.capacity import ModelFacts

    config = {"model_type": "llama", "vocab_size": 32000, "dtype": "bfloat16", **SHAPES[name]}
    return ModelFacts.of_config(config, n_inputs=4)


def task_facts(requests: int, tokens: int):
    """`requests` loglikelihood requests of `tokens` tokens each, one continuation per example."""
    from evomerge.capacity import TaskFacts

    return TaskFacts(
        requests=requests,
        longest=tokens,
        generates=False,
        refine_rows=requests,
        refine_tokens=requests * tokens,
        scored_tokens=requests * tokens,
        scored_lengths=(tokens,) * requests,
        largest_subset=requests,
        refine_positions=requests * tokens,
    )


def speed_of(args, gpus_per_worker: int, batch):
    """`timing.gpu_speed` of the kind, with the figures the flags replace."""
    from evomerge.capacity.timing import GPU_MFU, GPUS, gpu_speed

    speed = gpu_speed(args.gpu_kind, gpus_per_worker, batch=batch if isinstance(batch, int) else 64)
    if args.tflops is None and args.mfu is None and args.h2d is None:
        return speed
    kind = next((k for k in GPUS if args.gpu_kind.upper().startswith(k)), "H100")
    tflops = args.tflops if args.tflops is not None else GPUS[kind][0] / 1e12
    mfu = args.mfu if args.mfu is not None else GPU_MFU
    changes = {"flops": tflops * 1e12 * mfu, "name": f"{speed.name} (flags: {tflops:g} TFLOP/s at {mfu:.0%})"}
    if args.h2d is not None:
        changes["merge_bytes_s"] = args.h2d * 1e9 * gpus_per_worker
    return replace(speed, **changes)


def schedule(args) -> tuple[int, int]:
    """(rounds, steps) of a default `refine:` block for a budget of `--trials` (`--steps` replaces the steps)."""
    from evomerge.config.schema import RefineConfig

    refine = RefineConfig()
    return len(refine.starts(args.trials)), args.steps or refine.schedule(args.trials)[0]


def project(args) -> list[dict]:
    from evomerge.candidate.portfolio import COMMON_METHODS
    from evomerge.capacity import Settings, evaluate_plan, given_devices
    from evomerge.capacity.plan import refine_batch
    from evomerge.capacity.timing import trial_time

    node = given_devices(args.host_memory, f"{args.gpus}x{args.gpu_memory}")
    portfolio = tuple(m for m in COMMON_METHODS if m != args.method) if args.portfolio else ()
    rows = []
    for name in SHAPES:
        model = model_facts(name)
        tasks = task_facts(args.requests, args.tokens)
        for k in (1, 2, 4, 8):
            if k > args.gpus:
                break
            settings = Settings(
                count=args.gpus // k, num_gpus=float(k), refine=True, method=args.method, portfolio=portfolio
            )
            plan = evaluate_plan(model, tasks, settings, node)
            if not plan.problems:
                break
        rounds, steps = schedule(args)
        speed = speed_of(args, k, plan.worker.batch_size)
        t = trial_time(model, refine_batch(model, tasks), speed, args.trials, rounds, steps, args.method, portfolio)
        rows.append(_row(name, model, plan, k, t, args))
    return rows


def _row(name: str, model, plan, k: int, t, args) -> dict:
    from evomerge.capacity.timing import SUBSPACE_METHODS

    w = plan.worker
    workers = args.gpus // k if not plan.problems else 0
    return {
        "model": name,
        "params_B": model.params / 1e9,
        "resident_GB": w.resident / 1e9,
        "inputs_GB": sum(model.input_bytes) / 1e9,
        "gpus_per_worker": k if not plan.problems else None,
        "refine_GB": w.refinement / 1e9,
        "per_gpu_GB": max(w.per_device) / 1e9,
        "batch": w.batch_size,
        "workers_per_node": workers,
        "host_per_node_GB": plan.node_bytes(workers, True) / 1e9,
        "merge_s": t.merge,
        "svd_s": t.subspace,
        "eval_s": t.evaluation,
        "refine_s": t.refinement,
        "overhead_s": t.overhead,
        "trial_s": t.total,
        "trials_per_hour_node": workers * 3600 / t.total if workers else 0,
        "trials_h": t.night(args.trials, 0, workers) / 3600 if workers else None,
        "portfolio_h": t.portfolio_s(len(t.portfolio), workers or 1) / 3600,
        "portfolio_subspace_s": {m: s for m, s in t.portfolio if m in SUBSPACE_METHODS},
        "speed": t.speed.name,
        "problem": plan.problems[0] if plan.problems else "",
    }


def _rate(per_hour: float) -> str:
    return f"{per_hour:,.0f}" if per_hour >= 10 else f"{per_hour:.2f}"


def table(rows: list[dict], args) -> str:
    head = (
        "| model | resident (bf16) | inputs (base + 3) | GPUs per worker | refinement extra | per GPU | eval batch | "
        "workers per node | host per node | merge s | eval s | refine s / trial | s / trial | trials / hour / node "
        f"| {args.trials} trials | portfolio merges |"
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * 14]
    for r in rows:
        night = f"{r['trials_h']:.1f} h" if r["trials_h"] is not None else "-"
        night += f" | {r['portfolio_h']:.1f} h" if args.portfolio else " | -"
        lines.append(
            f"| {r['model']} ({r['params_B']:.1f}B) | {r['resident_GB']:.1f} GB | {r['inputs_GB']:.0f} GB | "
            f"{r['gpus_per_worker'] or 'does not fit'} | {r['refine_GB']:.1f} GB | {r['per_gpu_GB']:.1f} GB | "
            f"{r['batch']} | {r['workers_per_node']} | {r['host_per_node_GB']:.0f} GB | {r['merge_s']:.1f} | "
            f"{r['eval_s']:.2f} | {r['refine_s']:.1f} | {r['trial_s']:.1f} | {_rate(r['trials_per_hour_node'])} | "
            f"{night} |"
        )
    rounds, steps = schedule(args)
    lines += [
        "",
        f"Assumptions: {args.gpus} GPUs of {args.gpu_memory} per node, {args.host_memory} host memory; a worker on "
        f"{rows[0]['speed']} (the 7B row's; capacity/timing.py); method {args.method}; tasks {args.requests} x "
        f"{args.tokens} tokens; {args.trials} trials with {rounds} refinement rounds of {steps} steps"
        + (", the portfolio's default merges" if args.portfolio else "")
        + ".",
    ]
    if any(r["svd_s"] for r in rows):
        lines.append("Of the merge, the method's SVDs on one CPU thread: " + ", ".join(
            f"{r['model']} {r['svd_s']:.0f} s" for r in rows) + ".")  # fmt: skip
    if args.portfolio and rows[0]["portfolio_subspace_s"]:
        lines.append("The portfolio's subspace merges (merge + evaluation, their SVDs on one CPU thread): " + "; ".join(
            f"{r['model']} " + ", ".join(f"{m} {s / 3600:.1f} h" for m, s in r["portfolio_subspace_s"].items())
            for r in rows) + ".")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu-memory", default="80G", help="each GPU's free memory (default 80G: an H100)")
    ap.add_argument("--gpu-kind", default="H100", help="the GPUs' kind, from capacity/timing.py's table (H100)")
    ap.add_argument("--host-memory", default="2T", help="host memory per node (default 2T)")
    ap.add_argument("--h2d", type=float, help="host-to-device GB/s per GPU (default: the time plan's 22)")
    ap.add_argument("--tflops", type=float, help="bf16 dense TFLOP/s per GPU (default: the kind's)")
    ap.add_argument("--mfu", type=float, help="utilization of those FLOP/s (default: the time plan's 0.35)")
    ap.add_argument("--requests", type=int, default=200, help="search requests per trial (default 200)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per request (default 256)")
    ap.add_argument("--trials", type=int, default=300, help="the budget's trials (default 300)")
    ap.add_argument("--steps", type=int, help="refinement steps per round (default: refine's, 60)")
    ap.add_argument("--method", default="task_arithmetic", help="the searched method (default task_arithmetic)")
    ap.add_argument("--no-portfolio", dest="portfolio", action="store_false", help="no portfolio merges")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    rows = project(args)
    print(json.dumps(rows, indent=2) if args.json else table(rows, args))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
