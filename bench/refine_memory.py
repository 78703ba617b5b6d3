"""Refinement memory and per-step cost: the engine within the resident model's memory against the old one.

    .venv/bin/python bench/refine_memory.py                  # ~100M-parameter Llama, base + 3 fine-tunes (~25 min)
    .venv/bin/python bench/refine_memory.py --params 3e7     # smaller, quicker
    .venv/bin/python bench/refine_memory.py --keep /tmp/rm --skip old-search   # reuse the checkpoints
    .venv/bin/python bench/refine_memory.py --params 3e7 --skip search,old-search --rows --method ties

Writes synthetic Llama checkpoints (bench/merge_speed.py's: a random base and three fine-tunes = base + noise,
the zoo's tokenizer, float32), then runs each measurement in its own process and reads its peak RSS with
os.wait4:
  search             `evomerge search` in-process (workers.count 0) on a zoo task: --trials trials, no refinement
  search + refine    the same search with one refinement round of --steps steps at half the budget (the engine
                     of evomerge/refine/tensor.py: gradient of the resident model, streamed inner products)
  old-search         the same with the engine evomerge had before (tests/refine_reference.py: base and task
                     vectors held whole, autograd through the merge, every example in one batch), where the
                     estimate of its memory fits in what the machine has free
  extra              one engine's round alone in a fresh process, after one merge (the resident state a search
                     has): its peak RSS over that state (VmHWM reset through /proc/self/clear_refs), against
                     what `refine_extra_bytes` (the resource plan's formula) predicts for the new engine; with
                     --rows also a per-row round (refine/rows.py), against the same formula with every tensor
                     moving (and, for ties, the plan's `row_ties_bytes`)
  steps              seconds per refinement step (the median interval between steps), new and old engine
                     alternating in one process (the best of --repeats rounds), on the synthetic model and on
                     the tiny zoo (built here unless --zoo)
Prints the resident model's bytes, each peak, the extra a refinement round adds over the search without one and
its ratio to the model's bytes (issue 19's target: at most 2.5). Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINE_TUNES = ("ft1", "ft2", "ft3")
TARGET = 2.5  # refinement's extra peak RSS / resident model bytes (issue 19)


def search_config(root: Path, run: Path, args, refine: bool) -> dict:
    return {
        "name": "refine-bench",
        "base_model": str(root / "base"),
        "models": [str(root / m) for m in FINE_TUNES],
        "method": args.method,
        "tasks": {"search": [{"name": args.task, "subset": args.subset}]},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": args.trials},
        "workers": {"count": 0},
        "storage": f"sqlite:///{run / 'study.db'}",
        "portfolio": False,
        "early_stop": None,
        "refine": {"at": [0.5], "steps": args.steps, "every": args.steps} if refine else None,
    }


# ---- measurements (each in its own process: `--_measure JSON`) -----------------------------------------------
def measure_search(spec: dict) -> dict:
    from evomerge.config.schema import parse_config
    from evomerge.run.driver import run_search

    if spec["engine"] == "old":
        import evomerge.refine.tensor as refine

        sys.path.insert(0, str(REPO / "tests"))
        from refine_reference import AutogradRefiner

        refine.Refiner = AutogradRefiner  # Worker.refine imports it from the module when the round starts
    os.chdir(spec["run"])
    t0 = time.perf_counter()
    result = run_search(parse_config(spec["config"]), progress=False, log=None)
    return {"trials": result.n_complete, "seconds": time.perf_counter() - t0}


def _engines(spec: dict):
    """The model's evaluator and each engine asked for, with the start point; the resident model merged once (as
    a search's trials leave it before a round)."""
    from evomerge.candidate.evaluator import Evaluator
    from evomerge.candidate.space import SearchSpace, load_space_spec, num_layers
    from evomerge.refine.rows import RowRefiner
    from evomerge.refine.tensor import Refiner
    from evomerge.scoring.tasks import TaskSpec

    sys.path.insert(0, str(REPO / "tests"))
    from refine_reference import AutogradRefiner

    root, models = Path(spec["root"]), [str(Path(spec["root"]) / m) for m in spec["models"]]
    tasks = [TaskSpec(name=t, subset=spec["subset"]) for t in spec["tasks"]]
    ev = Evaluator(models, root / "base", {"search": tasks})
    space = SearchSpace(load_space_spec(spec["method"]), num_layers(root / "base"))
    args = (ev.materializer, ev.scorer("search"), space, models, str(root / "base"), spec["method"])
    kinds = {"new": Refiner, "old": AutogradRefiner, "rows": RowRefiner}
    engines = {name: kinds[name](*args) for name in spec["engines"]}
    point = space.defaults(models)
    ev.load(space.to_recipe(point, models, str(root / "base"), spec["method"], seed=0))
    return ev, engines, point


def measure_steps(spec: dict) -> dict:
    """Seconds per step of each engine (the median interval between its steps' log lines; the first interval,
    prepare and the first loss, apart), the engines alternating for --repeats rounds, the best round kept."""
    import statistics

    ev, engines, point = _engines(spec)
    out: dict[str, float] = {}
    for _ in range(spec["repeats"]):
        for name, engine in engines.items():
            stamps = [time.perf_counter()]
            engine.run(point, steps=spec["steps"], every=1, log=lambda _line: stamps.append(time.perf_counter()))
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            out[name] = min(out.get(name, float("inf")), statistics.median(gaps[1:]))
            out[f"{name} first"] = min(out.get(f"{name} first", float("inf")), gaps[0])
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in ev.materializer.model.parameters())
    return out


def measure_extra(spec: dict) -> dict:
    """One engine's round in a fresh process: its peak RSS over the resident state (model merged, inputs'
    pages touched), and the figures `refine_extra_bytes` needs."""
    import torch

    ev, engines, point = _engines(spec)
    (engine,) = engines.values()
    before = _rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the round's own peak from here
    engine.run(point, steps=spec["steps"], every=spec["steps"])
    out = {"extra": _rss("VmHWM") - before}
    if "rows" in engines:  # what the plan reads: every floating tensor moves
        sizes = [p.numel() * p.element_size() for p in ev.materializer.model.parameters()]
        out["moving_bytes"], out["largest"] = sum(sizes), max(sizes)
        out["tokens"] = max(b.ids.numel() for b in engine.batches)
        out["answers"] = max(b.ids.shape[0] * b.keep for b in engine.batches)
    if "new" in engines:
        start = engine.prepare(point)
        moving = [t.target.numel() * t.target.element_size() for t in start.tensors if t.moves]
        out["moving_bytes"], out["largest"] = sum(moving), max(moving)
        out["tokens"] = max(b.rows * b.ids.shape[1] for b in engine.batches())
        out["answers"] = max(b.rows * b.keep for b in engine.batches())
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in ev.materializer.model.parameters())
    out["threads"], out["root"], out["models"] = torch.get_num_threads(), spec["root"], len(spec["models"])
    out["method"] = spec["method"]
    return out


def _rss(field: str) -> int:
    """This process's VmRSS or VmHWM (peak) in bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def _measure_main(spec: dict) -> None:
    kind = spec.pop("kind")
    if kind == "build":
        sys.path.insert(0, str(REPO / "bench"))
        from merge_speed import build_inputs

        res = build_inputs(Path(spec["root"]), spec["params"], "float32", fine_tunes=FINE_TUNES)
    elif kind == "zoo":
        from evomerge.zoo.build import build_zoo

        build_zoo(spec["out"], seed=0, size="tiny", log=None)
        res = {}
    elif kind == "search":
        res = measure_search(spec)
    elif kind == "steps":
        res = measure_steps(spec)
    elif kind == "extra":
        res = measure_extra(spec)
    else:
        raise SystemExit(f"unknown measurement {kind}")
    print("RESULT " + json.dumps(res), flush=True)


def _measure(spec: dict, log: Path) -> dict:
    """One measurement in a process of its own, with the CLI's thread discipline (evomerge/threads.py: on a busy
    machine, OpenMP threads that spin while they wait make every small op wait for a time slice)."""
    sys.path.insert(0, str(REPO / "bench"))
    from merge_speed import _run

    from evomerge.threads import THREAD_ENV, cpus_given

    env = {**THREAD_ENV, "OMP_NUM_THREADS": str(cpus_given())}
    env = {k: os.environ.get(k, v) for k, v in env.items()}  # an explicit setting wins, as in the CLI
    return _run([sys.executable, __file__, "--_measure", json.dumps(spec)], log, env)


# ---- the run --------------------------------------------------------------------------------------------------
def model_bytes(base: Path) -> int:
    """The resident model's parameter bytes, from the base's headers (the bench's checkpoints store no buffers)."""
    import math

    from evomerge.io.checkpoint import Checkpoint

    ck = Checkpoint(base)
    return sum(math.prod(ck.shape(n)) * ck.dtype(n).itemsize for n in ck.tensor_names())


def old_fits(nbytes: int) -> bool:
    """The old engine holds the base and 3 task vectors in float32 plus the merge's graph (~3x that): does it fit?"""
    free = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    return 3 * (1 + len(FINE_TUNES)) * nbytes < 0.6 * free


def run(args) -> dict:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="refine-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    out: dict = {}
    if not (root / "base" / "model.safetensors").is_file():
        out["build"] = _measure({"kind": "build", "root": str(root), "params": args.params}, root / "build.log")
    nbytes = model_bytes(root / "base")
    out["model_bytes"] = nbytes
    runs = [("search", False, "new"), ("search + refine", True, "new")]
    if "old-search" not in skip and old_fits(nbytes):
        runs.append(("old-search", True, "old"))
    for label, refine, engine in runs if "search" not in skip else []:
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        spec = {"kind": "search", "engine": engine, "run": str(run_dir)}
        spec["config"] = search_config(root, run_dir, args, refine)
        out[label] = _measure(spec, root / f"{label.replace(' ', '')}.log")
        print(f"{label}: {json.dumps(out[label])}", flush=True)
    if "steps" not in skip:
        zoo = Path(args.zoo) if args.zoo else root / "zoo"
        if not (zoo / "zoo.json").is_file():
            _measure({"kind": "zoo", "out": str(zoo)}, root / "zoo.log")
        common = {"method": args.method, "steps": args.steps, "repeats": args.repeats}
        syn = {**common, "root": str(root), "models": list(FINE_TUNES), "tasks": [args.task], "subset": args.subset}
        zoo_spec = {**common, "root": str(zoo), "models": ["add", "reverse"], "subset": 16}
        zoo_spec["tasks"] = ["zoo_add_greedy_search", "zoo_reverse_search"]
        old = ["old"] if old_fits(nbytes) else []
        for engine in ["new", *old, *(["rows"] if args.rows else [])]:
            spec = {**syn, "kind": "extra", "engines": [engine]}
            out[f"extra: {engine}"] = _measure(spec, root / f"extra-{engine}.log")
        for label, spec in (("steps: tiny zoo", zoo_spec), ("steps: synthetic", syn)):
            engines = ["new", "old"] if label.endswith("zoo") else ["new", *old]
            out[label] = _measure({**spec, "kind": "steps", "engines": engines}, root / f"{label[7:]}.log")
    return out


def report(res: dict, args) -> str:
    nbytes = res["model_bytes"]
    mib = lambda b: f"{b / 2**20:,.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}"  # noqa: E731
    lines = [f"resident model: {mib(nbytes)} MiB of parameters (float32, synthetic Llama, --params {args.params:g})"]
    base = res.get("search", {}).get("rss_gb")
    head = f"{'measurement':<22} {'peak RSS MiB':>12} {'extra MiB':>10} {'extra / model':>13} {'wall s':>8}"
    lines += [head, "-" * len(head)]
    for label in ("search", "search + refine", "old-search"):
        r = res.get(label)
        if not r:
            continue
        if "error" in r:
            lines.append(f"{label:<22} ERROR {r['error'][:200]}")
            continue
        peak = r["rss_gb"] * 2**30
        extra = peak - base * 2**30 if base and label != "search" else None
        ratio = f"{extra / nbytes:.2f}" if extra is not None else ""
        lines.append(
            f"{label:<22} {mib(peak):>12} {mib(extra) if extra is not None else '':>10} {ratio:>13} {r['wall']:>8.1f}"
        )
        if label == "search + refine" and extra is not None:
            verdict = "met" if extra / nbytes <= TARGET else "MISSED"
            lines.append(f"  target: extra <= {TARGET} x model bytes: {verdict}")
    lines.append("")
    lines += _extras(res, nbytes)
    for label in ("steps: tiny zoo", "steps: synthetic"):
        r = res.get(label)
        if not r or "error" in r:
            lines.append(f"{label}: {r.get('error', '')[:300] if r else 'not run'}")
            continue
        old = f"{r['old']:.3f}" if "old" in r else "not run"
        ratio = f" (new / old {r['new'] / r['old']:.2f})" if "old" in r else ""
        first = f"; prepare + first loss: new {r['new first']:.2f} s" + (
            f", old {r['old first']:.2f} s" if "old first" in r else ""
        )
        lines.append(f"{label} ({mib(r['model_bytes'])} MiB): s/step new {r['new']:.3f}, old {old}{ratio}{first}")
    return "\n".join(lines)


def _extras(res: dict, nbytes: int) -> list[str]:
    """Each engine's round in a fresh process, over the resident state; the plan's formula for the new one."""
    from evomerge.refine.footprint import refine_extra_bytes

    lines = []
    for engine in ("new", "old", "rows"):
        r = res.get(f"extra: {engine}")
        if not r or "error" in r:
            continue
        lines.append(
            f"round alone, {engine} engine: peak RSS over the resident state {r['extra'] / 2**20:,.0f} MiB = "
            f"{r['extra'] / nbytes:.2f} x model bytes"
        )
        if engine in ("new", "rows"):
            config = json.loads((Path(r["root"]) / "base" / "config.json").read_text())
            predicted = refine_extra_bytes(
                config, r["moving_bytes"], r["models"], largest=r["largest"], tokens=r["tokens"],
                answer_tokens=r["answers"], threads=r["threads"],
            )  # fmt: skip
            if engine == "rows" and r["method"] == "ties":  # the plan's host term of a per-row TIES step (float32)
                predicted["row ties"] = (6 * r["models"] + 6) * r["largest"]
                predicted["device"] += predicted["row ties"]
            terms = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in predicted.items() if k not in ("device", "host"))
            lines.append(
                f"  refine_extra_bytes predicts {predicted['device'] / 2**20:,.0f} MiB ({terms} MiB; micro-batch of "
                f"{r['tokens']} positions, {r['answers']} read by the loss, {r['threads']} threads): measured / "
                f"predicted {r['extra'] / predicted['device']:.2f}"
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1e8, help="approximate parameter count (default 1e8)")
    ap.add_argument("--method", default="task_arithmetic", help="merge method and its shipped space")
    ap.add_argument("--task", default="zoo_add_search", help="the zoo task the search scores and refines on")
    ap.add_argument("--subset", type=int, default=16, help="examples of the task per trial (and refined on)")
    ap.add_argument("--trials", type=int, default=4, help="trials of each search (the round starts at half)")
    ap.add_argument("--steps", type=int, default=3, help="refinement steps")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the per-step timing (best of)")
    ap.add_argument("--keep", help="folder for the checkpoints (reused when present); default a temp folder")
    ap.add_argument("--zoo", help="the tiny zoo for the per-step timing (default: built under the folder)")
    ap.add_argument("--skip", default="", help="comma-separated: search, old-search, steps")
    ap.add_argument("--rows", action="store_true", help="also measure a per-row round alone (refine/rows.py)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        _measure_main(json.loads(args._measure))
        return 0
    res = run(args)
    print(report(res, args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
