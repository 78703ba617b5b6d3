"""The projection table of docs/gpus.md: per-trial cost and memory of a search at 7B, 13B and 70B on GPUs, from
the resource plan's formulas (evomerge/capacity) and the per-trial figures bench/scale.py measures on CPU.

    .venv/bin/python bench/projection.py                                   # the table, with its assumptions
    .venv/bin/python bench/projection.py --h2d 22 --merge-x 2.4 --mfu 0.35 # with bench/gpu_check.py's figures
    .venv/bin/python bench/projection.py --scale scale.json                # overhead per trial from a scale run

A PROJECTION, not a measurement: memory is the plan's (exact formulas of what evomerge allocates, checked within
20% against measured peaks on CPU by bench/scale.py), times are the formulas below with the stated assumptions.
Per size: a Llama-2 shape in bfloat16, a base and three fine-tunes; the user's search tasks: `--requests`
examples of `--tokens` tokens, loglikelihood; one refinement round of `--steps` steps per `--trials` trials.

    merge      = inputs' bytes / (GPUs per worker x host-to-device GB/s) x merge-x        (inputs stream from the
                 page cache over each GPU's own link; merge-x: a candidate's time over that floor)
    evaluation = 2 x params x requests x tokens / (GPU FLOP/s x mfu) + lm-eval's per-call cost on CPU
                 (the layers of a split model run one GPU after the other: more GPUs do not speed it up)
    refinement = steps x (merge + 3 x evaluation's FLOPs) / trials                        (a step writes the
                 surrogate's weights like a merge, then a forward and backward pass)
    overhead   = the search's own per-trial cost (sampler, storage, Ray), measured on CPU
    per node   = workers (8 GPUs / GPUs per worker) in parallel: trials per hour = workers x 3600 / per trial
"""

from __future__ import annotations

import argparse
import json
import sys
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


def project(args) -> list[dict]:
    from evomerge.capacity import ModelFacts, Settings, TaskFacts, evaluate_plan, given_devices

    node = given_devices(args.host_memory, f"{args.gpus}x{args.gpu_memory}")
    tasks = TaskFacts(
        requests=args.requests,
        longest=args.tokens,
        generates=False,
        refine_rows=args.requests,
        refine_tokens=args.requests * args.tokens,
    )
    rows = []
    for name, shape in SHAPES.items():
        config = {"model_type": "llama", "vocab_size": 32000, "dtype": "bfloat16", **shape}
        model = ModelFacts.of_config(config, n_inputs=4)
        for k in (1, 2, 4, 8):
            if k > args.gpus:
                break
            settings = Settings(count=args.gpus // k, num_gpus=float(k), refine=True, method="task_arithmetic")
            plan = evaluate_plan(model, tasks, settings, node)
            if not plan.problems:
                break
        rows.append(_row(name, model, tasks, plan, k, args))
    return rows


def _row(name: str, model, tasks, plan, k: int, args) -> dict:
    w = plan.worker
    inputs = sum(model.input_bytes)
    merge = inputs / (k * args.h2d * 1e9) * args.merge_x
    flops = 2 * model.params * tasks.requests * tasks.longest
    evaluation = flops / (args.tflops * 1e12 * args.mfu) + args.lm_eval_s
    refinement = args.steps * (merge + 3 * flops / (args.tflops * 1e12 * args.mfu)) / args.trials
    per_trial = merge + evaluation + refinement + args.overhead
    workers = args.gpus // k if not plan.problems else 0
    return {
        "model": name,
        "params_B": model.params / 1e9,
        "resident_GB": w.resident / 1e9,
        "inputs_GB": inputs / 1e9,
        "gpus_per_worker": k if not plan.problems else None,
        "refine_GB": w.refinement / 1e9,
        "per_gpu_GB": max(w.per_device) / 1e9,
        "batch": w.batch_size,
        "workers_per_node": workers,
        "host_per_node_GB": plan.node_bytes(workers, True) / 1e9,
        "merge_s": merge,
        "eval_s": evaluation,
        "refine_s": refinement,
        "trial_s": per_trial,
        "trials_per_hour_node": workers * 3600 / per_trial if workers else 0,
        "problem": plan.problems[0] if plan.problems else "",
    }


def table(rows: list[dict], args) -> str:
    head = (
        "| model | resident (bf16) | inputs (base + 3) | GPUs per worker | refinement extra | per GPU | eval batch | "
        "workers per node | host per node | merge s | eval s | refine s / trial | s / trial | trials / hour / node |"
    )
    lines = [head, "|" + "---|" * 2 + "---:|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['params_B']:.1f}B) | {r['resident_GB']:.1f} GB | {r['inputs_GB']:.0f} GB | "
            f"{r['gpus_per_worker'] or 'does not fit'} | {r['refine_GB']:.1f} GB | {r['per_gpu_GB']:.1f} GB | "
            f"{r['batch']} | {r['workers_per_node']} | {r['host_per_node_GB']:.0f} GB | {r['merge_s']:.1f} | "
            f"{r['eval_s']:.2f} | {r['refine_s']:.1f} | {r['trial_s']:.1f} | {r['trials_per_hour_node']:.0f} |"
        )
    lines.append("")
    lines.append(
        f"Assumptions: {args.gpus} GPUs of {args.gpu_memory} per node, {args.host_memory} host memory; "
        f"host-to-device {args.h2d:g} GB/s per GPU, a merge {args.merge_x:g}x its floor; {args.tflops:g} TFLOP/s "
        f"bf16 at {args.mfu:g} utilization, lm-eval {args.lm_eval_s:g} s per call; tasks {args.requests} x "
        f"{args.tokens} tokens; one refinement round of {args.steps} steps per {args.trials} trials; overhead "
        f"{args.overhead:g} s per trial."
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu-memory", default="80G", help="each GPU's free memory (default 80G: an H100)")
    ap.add_argument("--host-memory", default="2T", help="host memory per node (default 2T)")
    ap.add_argument("--h2d", type=float, default=25.0, help="host-to-device GB/s per GPU from the page cache (25)")
    ap.add_argument("--merge-x", type=float, default=3.0, help="a merge's time over its floor (3: the target)")
    ap.add_argument("--tflops", type=float, default=989.0, help="bf16 dense TFLOP/s per GPU (989: H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.3, help="utilization of those FLOP/s by evaluation (0.3)")
    ap.add_argument("--lm-eval-s", type=float, default=0.3, help="lm-eval's own cost per call, seconds (0.3)")
    ap.add_argument("--requests", type=int, default=200, help="search examples per trial (default 200)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per example, padded (default 256)")
    ap.add_argument("--steps", type=int, default=60, help="refinement steps per round (default 60)")
    ap.add_argument("--trials", type=int, default=100, help="trials per refinement round (default 100)")
    ap.add_argument("--overhead", type=float, default=0.1, help="the search's own seconds per trial (0.1)")
    ap.add_argument("--scale", metavar="JSON", help="bench/scale.py --json output: take the overhead from it")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if args.scale:
        runs = [r for r in json.loads(Path(args.scale).read_text()) if "trials" in r]
        if runs:
            big = max(runs, key=lambda r: r["params"])
            merge = sum(t["merge_s"] or 0 for t in big["trials"])
            ev = sum(t["eval_s"] or 0 for t in big["trials"])
            refine = sum(r["seconds"] for r in big["measured"]["refine_rounds"])
            args.overhead = max(0.0, (big["loop_s"] - merge - ev - refine) / len(big["trials"]))
    rows = project(args)
    print(json.dumps(rows, indent=2) if args.json else table(rows, args))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
