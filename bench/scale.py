"""The scale rehearsal on CPU: the resource plan's predictions against measured peaks, and what a trial costs, at
two model sizes, and how each grows from the small one to the large one.

    nice -n 10 .venv/bin/python bench/scale.py                         # 0.5B and 1.5B, bfloat16 (~20 GB RAM at 1.5B)
    .venv/bin/python bench/scale.py --sizes 5e8 --keep /tmp/scale      # one size; inputs kept in DIR and reused
    .venv/bin/python bench/scale.py --sizes 3e7 --trials 6             # a smoke run (~2 min)

Per size: synthetic Llama checkpoints (a random base and three fine-tunes = base + small noise, written as
bench/merge_speed.py writes them, the zoo's character tokenizer), then in a child process a short search as a
user would run it (`run_search`: task arithmetic over the shipped space, `zoo_add_greedy_search`, 10 trials, one
refinement round at half the budget, one Ray worker), measuring:
  driver RSS        the search process's peak RSS (os.wait4)
  actor RSS         the Ray worker's peak RSS (its /proc/PID/status VmHWM, read before the pool closes); it counts
                    the memory-mapped inputs' pages the worker touched (all of them, after the first merge)
  refinement extra  the worker's peak RSS during the refinement round (VmHWM reset as it starts) minus its RSS
                    just before it
  per trial         merge and eval seconds (each trial's record), the refinement round's seconds spread over the
                    trials, and the overhead: the rest of the search's wall time (sampler, Ray, storage, waiting)
The plan's figures are `evomerge.capacity.plan_search` of the same config, as `evomerge search` prints them:
actor peak = its runtime + resident model + the largest transient (evaluation, merge, refinement) + the page cache.
Then the growth from the small size to the large one, and the projection table of docs/gpus.md (`projection`).
Timings on a shared machine are upper bounds: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINE_TUNES = ("ft1", "ft2", "ft3")
HIDDEN = {3e7: 512, 3e8: 1024, 1e9: 2048}  # the smallest size each hidden width is used from
TASK = "zoo_add_greedy_search"


def _hidden(params: float) -> int:
    return [h for p, h in sorted(HIDDEN.items()) if params >= p][-1] if params >= 3e7 else 256


# ---- the child: one search, measured ---------------------------------------------------------------
def _vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:  # "5": VmHWM := VmRSS (Linux >= 4.0)
        fh.write("5")


def _watched_pool():
    """A WorkerPool that measures its worker: its peak RSS (kept across resets) and the refinement round's."""
    from evomerge.run.pool import WorkerPool

    class Watched(WorkerPool):
        def __init__(self, cfg, *args, **kwargs):
            super().__init__(cfg, *args, **kwargs)
            self.pid = self.pids[0]
            self.peak = _vm(self.pid)["VmHWM"]
            self.rounds: list[dict[str, float]] = []
            self.samples: list[tuple[float, int]] = []
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

        def _sample(self) -> None:  # RSS every 0.1 s, for the record (the peaks come from VmHWM)
            while not self._stop.wait(0.1):
                try:
                    self.samples.append((time.time(), _vm(self.pid)["VmRSS"]))
                except OSError:
                    return

        def refine(self, point, job):
            before = _vm(self.pid)
            self.peak = max(self.peak, before["VmHWM"])
            _reset_peak(self.pid)
            start = time.perf_counter()
            path = super().refine(point, job)
            seconds = time.perf_counter() - start
            during = _vm(self.pid)["VmHWM"]
            self.peak = max(self.peak, during)
            self.rounds.append({"seconds": seconds, "rss_before": before["VmRSS"], "peak": during})
            return path

        def close(self) -> None:
            self._stop.set()
            try:
                self.peak = max(self.peak, _vm(self.pid)["VmHWM"])
            except OSError:
                pass
            super().close()

    return Watched


def run_child(spec: dict) -> dict:
    """One search in this process (the driver), with its plan and measurements."""
    from evomerge.offline import go_offline

    go_offline()
    from evomerge.capacity import plan_search
    from evomerge.config.resolve import resolve_config
    from evomerge.config.schema import parse_config
    from evomerge.run.driver import run_search
    from evomerge.study.storage import load_study
    from evomerge.study.trials import complete_trials

    os.chdir(spec["run_dir"])
    cfg = parse_config(spec["config"], source="bench/scale.py")
    resolved = resolve_config(cfg)  # as the search resolves it: the plan it prints
    plan = plan_search(resolved.config, resolved.scorer)
    pools: list = []

    def factory(c):
        pools.append(_watched_pool()(c))
        return pools[0]

    t0 = time.perf_counter()
    result = run_search(cfg, progress=False, log=lambda m: print(m, flush=True), pool_factory=factory)
    wall = time.perf_counter() - t0
    pool = pools[0]
    trials = [t for t in complete_trials(load_study(cfg.name, cfg.storage_url))]
    w = plan.worker
    return {
        "plan": {
            "driver": _driver_prediction(),
            "actor": w.host + plan.page_cache,
            "actor_without_pages": w.host,
            "refinement": w.refinement,
            "evaluation": w.evaluation,
            "merge": w.merge,
            "resident": w.resident,
            "page_cache": plan.page_cache,
            "batch": w.batch_size,
            "lines": plan.lines(),
        },
        "measured": {
            "actor": pool.peak,
            "refine_rounds": pool.rounds,
            "samples": len(pool.samples),
        },
        "trials": [
            {k: t.user_attrs.get(k) for k in ("merge_s", "eval_s", "total_s")} | {"number": t.number} for t in trials
        ],
        "loop_s": result.wall_s,
        "wall_s": wall,
        "n_complete": result.n_complete,
    }


def _driver_prediction() -> int:
    from evomerge.capacity.memory import RUNTIME_HOST

    return RUNTIME_HOST


# ---- the parent: build, run, report --------------------------------------------------------------
def _run(cmd: list[str], log: Path) -> dict:
    """`cmd` in its own process: its RESULT line, wall time and peak RSS (os.wait4)."""
    t0 = time.perf_counter()
    # Ray's workers import evomerge from PYTHONPATH: this checkout, not whatever the environment has installed
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": path}
        )
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if code != 0:
        return {"error": f"exit {code}: " + "\n".join(text.splitlines()[-20:])}
    line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
    res = json.loads(line[7:]) if line else {}
    res["peak_rss"] = usage.ru_maxrss * 1024
    res["seconds"] = time.perf_counter() - t0
    return res


def _child_cmd(kind: str, spec: dict) -> list[str]:
    return [sys.executable, __file__, "--_child", json.dumps({"kind": kind, **spec})]


def config_for(root: Path, name: str, trials: int, dtype: str, refine: bool = True) -> dict:
    return {
        "name": name,
        "base_model": str(root / "base"),
        "models": [str(root / m) for m in FINE_TUNES],
        "method": "task_arithmetic",
        "search_space": "task_arithmetic",
        "tasks": {"search": [{"name": TASK, "metric": "acc", "subset": 20}]},
        "sampler": {"name": "cmaes", "seed": 0},
        "budget": {"n_trials": trials},
        "refine": {"at": [0.5], "steps": 4, "every": 2} if refine else None,
        "early_stop": None,
        "portfolio": False,
        "workers": {"count": 1, "num_cpus": max(1, len(os.sched_getaffinity(0)))},
        "dtype": dtype,
    }


def build(root: Path, params: float, dtype: str) -> dict:
    stamp = root / "shape.json"
    want = [params, dtype, list(FINE_TUNES)]
    if stamp.exists() and json.loads(stamp.read_text()).get("request") == want:
        return json.loads(stamp.read_text())["shape"]
    root.mkdir(parents=True, exist_ok=True)
    # in a child: a parent holding the built weights would carry them into every later child's peak RSS
    spec = {"root": str(root), "params": params, "dtype": dtype, "hidden": _hidden(params)}
    built = _run(_child_cmd("build", spec), root / "build.log")
    if "error" in built:
        raise SystemExit(f"building the inputs failed: {built['error']}")
    shape = {k: v for k, v in built.items() if k not in ("peak_rss", "seconds")}
    stamp.write_text(json.dumps({"request": want, "shape": shape}))
    return shape


def measure(root: Path, params: float, args) -> dict:
    shape = build(root / f"inputs-{params:g}", params, args.dtype)
    run_dir = root / f"run-{params:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = config_for(
        root / f"inputs-{params:g}", f"scale-{params / 1e6:.0f}m", args.trials, args.dtype, refine=not args.no_refine
    )
    res = _run(_child_cmd("search", {"run_dir": str(run_dir), "config": config}), run_dir / "search.log")
    res["shape"] = shape
    res["params"] = params
    return res


def summarize(res: dict) -> dict:
    """The figures of one size: peaks (predicted, measured) and the per-trial split."""
    trials = res["trials"]
    n = len(trials)
    merge = sum(t["merge_s"] or 0 for t in trials)
    ev = sum(t["eval_s"] or 0 for t in trials)
    rounds = res["measured"]["refine_rounds"]
    refine_s = sum(r["seconds"] for r in rounds)
    extra = max((r["peak"] - r["rss_before"] for r in rounds), default=0)
    overhead = res["loop_s"] - merge - ev - refine_s
    return {
        "params": res["shape"]["params"],
        "peaks": {
            "driver RSS": (res["plan"]["driver"], res["peak_rss"]),
            "actor RSS (peak)": (res["plan"]["actor"], res["measured"]["actor"]),
            "refinement extra": (res["plan"]["refinement"], extra),
        },
        "per_trial": {
            "merge": merge / n,
            "evaluation": ev / n,
            "refinement": refine_s / n,
            "overhead": overhead / n,
            "total": res["loop_s"] / n,
        },
        "medians": {
            "merge": statistics.median(t["merge_s"] for t in trials),
            "eval": statistics.median(t["eval_s"] for t in trials),
        },
        "n": n,
        "refine_s": refine_s,
    }


def report(results: list[dict], args) -> str:
    from evomerge.capacity import gb

    lines = []
    sums = []
    for res in results:
        if "error" in res:
            lines.append(f"size {res['params']:g}: FAILED: {res['error']}")
            continue
        s = summarize(res)
        sums.append(s)
        sh = res["shape"]
        lines.append(
            f"size {s['params'] / 1e9:.2f}B ({sh['num_hidden_layers']} layers, hidden {sh['hidden_size']}, "
            f"{args.dtype}; base + {len(FINE_TUNES)} fine-tunes): {s['n']} trials in {res['loop_s']:.0f} s"
        )
        lines += ["  " + line for line in res["plan"]["lines"]]
        lines.append(f"  {'':<20} {'predicted':>10} {'measured':>10} {'measured / predicted':>21}")
        for name, (pred, meas) in s["peaks"].items():
            ratio = meas / pred if pred else float("nan")
            lines.append(f"  {name:<20} {gb(pred):>10} {gb(meas):>10} {ratio:>21.2f}")
        p = s["per_trial"]
        lines.append(
            f"  per trial: merge {p['merge']:.2f} s, evaluation {p['evaluation']:.2f} s, refinement "
            f"{p['refinement']:.2f} s (one round, {s['refine_s']:.1f} s), overhead {p['overhead']:.2f} s = "
            f"{p['total']:.2f} s ({60 / p['total']:.1f} trials/min); medians: merge {s['medians']['merge']:.2f} s, "
            f"evaluation {s['medians']['eval']:.2f} s"
        )
    if len(sums) == 2:
        a, b = sums
        times = b["params"] / a["params"]
        lines.append(f"growth from {a['params'] / 1e9:.2f}B to {b['params'] / 1e9:.2f}B ({times:.2f}x the parameters):")
        for name in a["peaks"]:
            (pa, ma), (pb, mb) = a["peaks"][name], b["peaks"][name]
            lines.append(f"  {name:<20} {mb / max(ma, 1):.2f}x (predicted {pb / max(pa, 1):.2f}x)")
        for name in ("merge", "evaluation", "refinement", "overhead", "total"):
            x, y = a["per_trial"][name], b["per_trial"][name]
            lines.append(f"  {name + ' s/trial':<20} {y / x if x > 0 else float('nan'):.2f}x ({x:.2f} -> {y:.2f})")
    return "\n".join(lines)


def refine_memory(root: Path) -> str:
    """Issue 19's figure at ~100M parameters: the peak RSS a refinement round adds to an in-process search over
    the same search without refinement, against the resident model's bytes (target <= 2.5x). Measured by
    bench/refine_memory.py (the refinement's own bench), run here as it is."""
    script = REPO / "bench" / "refine_memory.py"
    if not script.is_file():
        return (
            "in-process refinement memory: bench/refine_memory.py is not in this checkout (it comes with branch refine)"
        )
    log = root / "refine_memory.log"
    cmd = [sys.executable, str(script), "--params", "1e8", "--skip", "old-search,steps", "--keep", str(root / "rm")]
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode
    text = log.read_text()
    head = f"in-process refinement memory at ~100M parameters ({' '.join(cmd[1:])}; exit {code}):"
    return "\n".join([head, *("  " + line for line in text.splitlines()[-25:])])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5e8,1.5e9", help="approximate parameter counts (default 5e8,1.5e9)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--no-refine", action="store_true", help="the same searches without the refinement round")
    ap.add_argument(
        "--no-refine-memory",
        action="store_true",
        help="skip bench/refine_memory.py (the in-process refinement memory against 2.5x the model at ~100M)",
    )
    ap.add_argument("--keep", metavar="DIR", help="build the inputs in DIR and keep them (reused if present)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    ap.add_argument("--report", metavar="JSON,...", help="only print the report of earlier --json files (one per size)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        results = [r for f in args.report.split(",") for r in json.loads(Path(f).read_text())]
        print(report(sorted(results, key=lambda r: r["params"]), args))
        return 0
    if args._child:
        spec = json.loads(args._child)
        if spec["kind"] == "build":
            sys.path.insert(0, str(REPO / "bench"))
            from merge_speed import build_inputs

            out = build_inputs(
                Path(spec["root"]), spec["params"], spec["dtype"], fine_tunes=FINE_TUNES, hidden=spec["hidden"]
            )
        else:
            out = run_child(spec)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-scale-"))
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {memory:.1f} GB; load average {load:.2f} at start")
    results = []
    try:
        for size in [float(s) for s in args.sizes.split(",") if s]:
            res = measure(root, size, args)
            results.append(res)
            print(report([res], args), flush=True)
        print()
        print(report(results, args))
        if not args.no_refine_memory:
            print(refine_memory(root), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end (2 cores: above ~1 means other work ran beside this)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
