"""GPU check: one prepared run (at most 8 minutes on one GPU) of what a user asks before a night of searches.

    .venv/bin/python bench/gpu_check.py 2>&1 | tee gpu_check.log     # a machine with an NVIDIA GPU (~5 min, H200)
    .venv/bin/python bench/gpu_check.py --device cpu                 # no GPU: every step on the CPU, toy sizes

It builds its own inputs (the demo zoo in a background process from the start; a synthetic Llama of ~1B
parameters in bfloat16, a base and three fine-tunes) and runs these steps, each guarded: a step that fails prints
why and the next one runs; the summary at the end has one line per step and every figure.

  1 bandwidth   device memory (a 1 GiB copy on the GPU), host to device from pinned memory and from the page cache
                of a memory-mapped input (what a merge streams)
  2 kernels     evomerge-1 merges bit-equal on the GPU and the CPU (every sparsifying method, float32 and
                bfloat16), and a resident model merged on the GPU equal to the CPU export (ties, dare_ties)
  3 merge       a candidate of the 1B model (ties, dare_ties, task_arithmetic): Materializer.apply on the GPU with
                the inputs streaming from the page cache against the floor of the bytes it moves (inputs over
                host-to-device, the output written once in device memory); and with the inputs resident on the
                GPU against the device-memory floor of its reads and writes (target: within 3x)
  4 search 1B   20 trials with a refinement round, the resident model on the GPU (in this process, so its peak
                GPU memory is measured): trials/min, merge ms, eval s, refinement s, peak GPU memory and host RSS
                against the plan (`evomerge.capacity`)
  5 search zoo  20 trials with refinement on the demo zoo through Ray, one worker with the GPU
  6 split       the resident model split over two devices of the group (cuda:0 twice on a one-GPU machine: the
                device map, hooks and per-device merge; two GPUs when there are) equals one
Exit 0 when every step passed, 1 when one failed or a result differed, 2 when there is no such device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))
SPARSIFYING = {
    "ties": {"weight": 0.7, "density": 0.3},
    "dare_ties": {"weight": 0.6, "density": 0.4},
    "dare_linear": {"weight": 0.5, "density": 0.7},
    "breadcrumbs": {"weight": 1.0, "density": 0.6, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 0.8, "density": 0.5, "gamma": 0.1},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
    "della_linear": {"weight": 0.6, "density": 0.4, "epsilon": 0.1},
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
}
INPUTS = ["base", "a", "b"]
FINE_TUNES = ("ft1", "ft2", "ft3")
GIB = 2**30


class Run:
    """The steps' results and the time left: every step runs through `step`, which never lets one failure stop
    the run."""

    def __init__(self, device, budget: float, quick: bool, root: Path):
        self.device, self.budget, self.quick, self.root = device, budget, quick, root
        self.start = time.perf_counter()
        self.results: list[tuple[str, str, dict]] = []  # (step, status, figures)
        self.failures = 0
        self.figures: dict = {}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def step(self, name: str, needs: float, fn, *args):
        """Run `fn(*args)` -> figures (a dict; `mismatch: N` counts as a failure) unless less than `needs` seconds
        are left."""
        if self.left() < needs:
            self.results.append((name, f"skipped: {self.left():.0f} s left of the budget, it needs ~{needs:.0f} s", {}))
            print(f"== {name}: skipped (time)", flush=True)
            return None
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            figures = fn(*args) or {}
        except Exception as exc:  # noqa: BLE001 - a failed step is reported and the run goes on
            traceback.print_exc()
            self.failures += 1
            self.results.append(
                (name, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", {})
            )
            return None
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        bad = int(figures.get("mismatch", 0))
        self.failures += bad > 0
        self.results.append((name, "ok" if not bad else f"MISMATCH ({bad})", figures))
        self.figures[name] = figures
        return figures


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- inputs --------------------------------------------------------------------------------------------
def start_zoo(root: Path, variant: str) -> subprocess.Popen:
    """`evomerge zoo build` in the background (CPU training), so it is ready by the zoo search."""
    log = open(root / f"zoo-{variant}.log", "w")  # noqa: SIM115 - closed with the process
    env = dict(os.environ)  # PYTHONPATH holds this checkout (main)
    cmd = [
        sys.executable,
        "-m",
        "evomerge",
        "zoo",
        "build",
        "--variant",
        variant,
        "--out",
        str(root / f"zoo-{variant}"),
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)


def build_synthetic(root: Path, params: float, device) -> dict:
    """A random Llama base and three fine-tunes (base + noise at a tenth of its scale), bfloat16, drawn on the
    device (seconds on a GPU) and written as bench/merge_speed.py writes them."""
    import torch
    from merge_speed import VOCAB, _write, llama_shape
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from evomerge.zoo.tokenizer import build_tokenizer

    shape = llama_shape(params, 2048 if params >= 1e9 else None)
    tok = build_tokenizer()
    config = LlamaConfig(
        **shape,
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {f"{p}self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    gen = torch.Generator(device=device).manual_seed(0)

    def draw(s, scale):
        return torch.randn(s, generator=gen, device=device) * scale

    base = {
        k: (torch.ones(s, device=device) if len(s) == 1 else draw(s, 0.02)).to(torch.bfloat16)
        for k, s in shapes.items()
    }
    for name in FINE_TUNES:
        model = {k: (v.float() + draw(v.shape, 0.002)).to(torch.bfloat16).cpu() for k, v in base.items()}
        _write(root / name, model, config, tok, save_file)
        del model
    _write(root / "base", {k: v.cpu() for k, v in base.items()}, config, tok, save_file)
    shape["params"] = sum(v.numel() for v in base.values())
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return shape


# ---- 1: bandwidth --------------------------------------------------------------------------------------
def bandwidth(device, synthetic: Path) -> dict:
    import torch

    from evomerge.io.checkpoint import Checkpoint

    n = (GIB if device.type == "cuda" else GIB // 8) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    out = {"device_GBps": round(2 * n * 4 / best / 1e9, 1)}
    del src, dst
    host = torch.ones(n, pin_memory=device.type == "cuda")
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        host.to(device, non_blocking=True)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    out["pinned_h2d_GBps"] = round(n * 4 / best / 1e9, 1)
    ckpt = Checkpoint(synthetic / "base")
    names = ckpt.tensor_names()
    for name in names:  # into the page cache and this process's mapping first
        ckpt.get(name).sum()
    total, best = sum(ckpt.get(x).numel() * 2 for x in names), float("inf")
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        for name in names:
            ckpt.get(name).to(device)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    out["mmap_h2d_GBps"] = round(total / best / 1e9, 1)
    return out


# ---- 2: kernels ----------------------------------------------------------------------------------------
def _params(method_name: str):
    from evomerge.merge.methods import get_method
    from evomerge.merge.plan import TensorParams

    method = get_method(method_name)
    per = SPARSIFYING.get(method_name, {})
    shared = {s.name: s.default for s in method.spec.parameters if s.scope.name == "SHARED"}
    per_input = {
        k: {s.name: per.get(s.name, s.default) for s in method.spec.parameters if s.scope.name != "SHARED"}
        for k in INPUTS
    }
    return method, TensorParams(name="model.layers.3.mlp.up_proj.weight", t=0.0, shared=shared, per_input=per_input)


def kernels(device, quick: bool) -> dict:
    """Every evomerge-1 method's merge on the device equals the CPU's bit for bit (SLERP printed, not counted:
    its norms are reductions whose order differs on a GPU)."""
    import torch

    from evomerge.merge.materialize import merge_tensor

    shapes = [(4096,), (1000, 1000)] + ([] if quick else [(5632, 2048)])
    mismatch, checked, worst = 0, 0, []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            g = torch.Generator().manual_seed(len(shape))
            base = torch.randn(shape, generator=g) * 0.02
            ts = [base] + [base + (torch.randn(shape, generator=g) * 0.002 / 1e-4).round() * 1e-4 for _ in range(2)]
            ts = [t.to(dtype) for t in ts]
            there = [t.to(device) for t in ts]
            for name in [*SPARSIFYING, "slerp"]:
                method, params = _params(name)
                k = 2 if name == "slerp" else 3
                if name == "slerp":
                    params.shared["t"] = 0.4
                cpu = merge_tensor(method, params, ts[:k], INPUTS[:k], "base", seed=3, kernels="evomerge-1")
                dev = merge_tensor(method, params, there[:k], INPUTS[:k], "base", seed=3, kernels="evomerge-1").cpu()
                bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
                same = torch.equal(cpu.view(bits), dev.view(bits))
                if name == "slerp":
                    worst.append(float((cpu.double() - dev.double()).abs().max()))
                    continue
                checked += 1
                if not same:
                    mismatch += 1
                    print(f"  {name} {dtype} {shape}: differs (max {(cpu.double() - dev.double()).abs().max():.3g})")
    out = {"checked": checked, "mismatch": mismatch, "slerp_max_diff": max(worst, default=0.0)}
    out.update(_resident_equals_export(device))
    out["mismatch"] += out.pop("resident_mismatch")
    return out


def _resident_equals_export(device) -> dict:
    """A resident model merged on the device equals export_recipe's CPU checkpoint (ties, dare_ties)."""
    import torch
    import yaml
    from merge_speed import build_inputs
    from safetensors.torch import load_file

    from evomerge.export.export import export_recipe
    from evomerge.merge.materialize import Materializer
    from evomerge.merge.recipe import Recipe

    root = Path(tempfile.mkdtemp(prefix="gpu-check-50m-"))
    try:
        build_inputs(root, 5e7, "float32")
        bad, times = 0, {}
        for method in ("ties", "dare_ties"):
            spec = {
                "merge_method": method,
                "base_model": str(root / "base"),
                "models": [
                    {"model": str(root / m), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("ft1", "ft2")
                ],
                "dtype": "float32",
                "evomerge": {"seed": 1, "kernels": "evomerge-1"},
            }
            (root / f"{method}.yaml").write_text(yaml.safe_dump(spec))
            recipe = Recipe.load(root / f"{method}.yaml")
            exported = load_file(str(export_recipe(recipe, root / f"out-{method}") / "model.safetensors"))
            mat = Materializer(recipe.input_models(), recipe.base_model, dtype="float32", device=str(device))
            mat.apply(recipe)
            sync(device)
            t0 = time.perf_counter()
            mat.apply(recipe)
            sync(device)
            times[method] = round(time.perf_counter() - t0, 3)
            state = mat.model.state_dict()
            differ = [k for k, v in exported.items() if not torch.equal(state[k].cpu(), v)]
            bad += bool(differ)
            if differ:
                print(f"  {method}: the resident model on {device} differs from the CPU export at {differ[0]}")
            del mat, state
        return {"resident_mismatch": bad, "apply_50M_s": times}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- 3: merge per candidate ----------------------------------------------------------------------------
def merge_floor(device, synthetic: Path, bw: dict) -> dict:
    import torch
    import yaml

    from evomerge.merge.materialize import Materializer
    from evomerge.merge.recipe import Recipe

    base = str(synthetic / "base")
    models = [str(synthetic / m) for m in FINE_TUNES]
    mat = Materializer(models, base, dtype="bfloat16", device=str(device))
    resident = sum(p.numel() * p.element_size() for p in mat.model.parameters())
    inputs = resident * (len(models) + 1)
    streaming = inputs / (bw["mmap_h2d_GBps"] * 1e9) + 2 * resident / (bw["device_GBps"] * 1e9)
    on_device = (inputs + resident) / (bw["device_GBps"] * 1e9)
    out = {
        "resident_GB": round(resident / 1e9, 2),
        "floor_streaming_ms": round(streaming * 1e3, 1),
        "floor_resident_ms": round(on_device * 1e3, 1),
    }
    recipes = {}
    for method in ("ties", "dare_ties", "task_arithmetic"):
        params = {"weight": 0.4, "density": 0.5} if method != "task_arithmetic" else {"weight": 0.4}
        entries = [{"model": m, "parameters": params} for m in models]
        spec = {
            "merge_method": method,
            "base_model": base,
            "models": entries,
            "dtype": "bfloat16",
            "evomerge": {"seed": 1},
        }
        recipes[method] = Recipe.model_validate(yaml.safe_load(yaml.safe_dump(spec)))

    def timed(recipe) -> float:
        mat.apply(recipe)  # warm-up
        best = float("inf")
        for _ in range(2):
            sync(device)
            t0 = time.perf_counter()
            mat.apply(recipe)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    for method, recipe in recipes.items():
        t = timed(recipe)
        out[f"{method}_streaming_ms"] = round(t * 1e3, 1)
        out[f"{method}_streaming_x_floor"] = round(t / streaming, 1)
    # inputs resident on the device: every checkpoint's get() hands out a device copy
    for ckpt in mat.checkpoints:
        held = {n: ckpt.get(n).to(device) for n in ckpt.tensor_names()}
        ckpt.get = held.__getitem__
    for method, recipe in recipes.items():
        t = timed(recipe)
        out[f"{method}_resident_ms"] = round(t * 1e3, 1)
        out[f"{method}_resident_x_floor"] = round(t / on_device, 1)
    if device.type == "cuda":
        out["peak_gpu_GB"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
    return out  # the resident model and the device copies go with this frame


# ---- 4, 5: searches ------------------------------------------------------------------------------------
def search_config(
    name: str, base: Path, models: list[Path], device, trials: int, workers: int, subset: int, timeout: float
) -> dict:
    """A search as a user configures one (the shipped task-arithmetic space, the zoo's greedy tasks, refinement at
    half the budget); `timeout` (budget.timeout) keeps it inside the run's budget."""
    return {
        "name": name,
        "base_model": str(base),
        "models": [str(m) for m in models],
        "method": "task_arithmetic",
        "search_space": "task_arithmetic",
        "tasks": {
            "search": [
                {"name": "zoo_add_greedy_search", "subset": subset},
                {"name": "zoo_reverse_greedy_search", "subset": subset},
            ]
        },
        "budget": {"n_trials": trials, "timeout": max(20.0, timeout)},
        "refine": {"at": [0.5], "steps": 10, "every": 5},
        "early_stop": None,
        "workers": {"count": workers, "num_cpus": 2, "num_gpus": 1 if device.type == "cuda" else 0},
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
    }


def _host_peak() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmHWM:"))


def search(device, config: dict, run_dir: Path, in_process: bool) -> dict:
    import torch

    from evomerge.capacity import plan_search
    from evomerge.config.schema import parse_config
    from evomerge.run.driver import run_search
    from evomerge.study.storage import load_study
    from evomerge.study.trials import complete_trials

    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    if device.type == "cuda":  # what earlier steps left in torch's cache is free memory again, for the plan too
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = parse_config(config, source="gpu_check")
    plan = plan_search(cfg)  # the search prints it too
    t0 = time.perf_counter()
    res = run_search(cfg, progress=False, log=lambda m: print("  " + m, flush=True))
    wall = time.perf_counter() - t0
    trials = complete_trials(load_study(cfg.name, cfg.storage_url))
    merge = sorted(t.user_attrs.get("merge_s", 0) for t in trials)
    evals = sorted(t.user_attrs.get("eval_s", 0) for t in trials)
    out = {
        "trials": len(trials),
        "trials_per_min": round(60 * res.n_complete / max(res.wall_s, 1e-9), 1),
        "merge_ms_median": round(1e3 * merge[len(merge) // 2], 1) if merge else None,
        "eval_s_median": round(evals[len(evals) // 2], 3) if evals else None,
        "wall_s": round(wall, 1),
        "refine_points": sum("refine_round" in t.user_attrs for t in trials),
        "best": res.best_value,
    }
    if in_process:
        out["host_peak_GB"] = round(_host_peak() / 1e9, 2)
        out["plan_host_GB"] = round((plan.worker.host + plan.page_cache) / 1e9, 2)
    if device.type == "cuda" and in_process:
        peak = torch.cuda.max_memory_reserved(device)
        out["peak_gpu_GB"] = round((peak + _context_bytes(device)) / 1e9, 2)
        out["plan_gpu_GB"] = round(max(plan.worker.per_device) / 1e9, 2)
        out["plan_batch"] = plan.worker.batch_size
    return out


def _context_bytes(device) -> int:
    """This process's GPU memory outside torch's allocator (its CUDA context), from nvidia-smi."""
    import torch

    from evomerge.capacity.devices import nvidia_smi

    rows = nvidia_smi() or []
    free_total = [(f, t) for _, _, f, t in rows]
    if not free_total:
        return 0
    index = torch.cuda.current_device() if device.index is None else device.index
    free, total = free_total[min(index, len(free_total) - 1)]
    return max(0, (total - free) - torch.cuda.memory_reserved(device))


# ---- 6: split ------------------------------------------------------------------------------------------
def split(device, zoo: Path) -> dict:
    import torch

    from evomerge.candidate.evaluator import Evaluator
    from evomerge.merge.recipe import Recipe
    from evomerge.scoring import TaskSpec

    count = torch.cuda.device_count() if device.type == "cuda" else 0
    two = [f"cuda:{i}" for i in range(2)] if count >= 2 else [str(device), str(device)]
    tasks = {"search": [TaskSpec(name="zoo_add_greedy_search", subset=50)]}
    models = _zoo_specialists(zoo)
    one = Evaluator(models, zoo / "base", tasks, device=str(device))
    sharded = Evaluator(models, zoo / "base", tasks, device=two)
    entries = [{"model": str(m), "parameters": {"weight": 0.6, "density": 0.5}} for m in models]
    recipe = Recipe.model_validate(
        {"merge_method": "ties", "base_model": str(zoo / "base"), "models": entries, "evomerge": {"seed": 2}}
    )
    a, b = one.evaluate(recipe, "search"), sharded.evaluate(recipe, "search")
    differ = [
        n
        for n, t in one.materializer.targets.items()
        if not torch.equal(t.cpu(), sharded.materializer.targets[n].cpu())
    ]
    slots = sorted(set(sharded.model.evomerge_slots.values()))
    mismatch = int(bool(differ)) + int(a.scores != b.scores)
    return {"devices": two, "slots": slots, "mismatch": mismatch, "objective": round(a.objective, 4)}


def _zoo_specialists(zoo: Path) -> list[Path]:
    """The specialists a zoo's zoo.json names (the folders beside `base` otherwise)."""
    meta = zoo / "zoo.json"
    names = list(json.loads(meta.read_text()).get("specialists") or {}) if meta.is_file() else []
    return [zoo / n for n in names] or sorted(p for p in zoo.iterdir() if p.is_dir() and p.name != "base")


# ---- the run ------------------------------------------------------------------------------------------
def environment(device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    missing = []
    for name in ("transformers", "accelerate", "mergekit", "lm_eval", "optuna", "ray", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            missing.append(name)
    if missing:  # the steps that need them fail with ModuleNotFoundError; the others run
        out["missing"] = missing
        print(f"missing packages: {', '.join(missing)} (install evomerge's dependencies beside your torch)")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {
            "gpu": props.name,
            "gpu_memory_GB": round(props.total_memory / 1e9, 1),
            "gpus": torch.cuda.device_count(),
        }
    out["cpus"] = len(os.sched_getaffinity(0))
    return out


def summary(run: Run) -> str:
    lines = ["", "==== summary ====", f"total {time.perf_counter() - run.start:.0f} s"]
    for name, status, figures in run.results:
        lines.append(f"{name}: {status}")
        for key, value in figures.items():
            lines.append(f"    {key}: {value}")
    merge = run.figures.get("3 merge") or {}
    if merge:
        for method in ("ties", "dare_ties", "task_arithmetic"):
            if f"{method}_resident_x_floor" in merge:
                x = merge[f"{method}_resident_x_floor"]
                verdict = "met" if x <= 3 else "MISSED"
                lines.append(f"target (a candidate within 3x of the floor, inputs resident): {method} {x}x: {verdict}")
    for key in ("4 search 1B",):
        s = run.figures.get(key) or {}
        if "peak_gpu_GB" in s:
            lines.append(
                f"plan vs measured GPU memory ({key}): predicted {s['plan_gpu_GB']} GB, measured {s['peak_gpu_GB']} GB"
            )
    lines.append("all steps passed" if not run.failures else f"{run.failures} step(s) failed or differed")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a run without a GPU")
    ap.add_argument(
        "--budget",
        type=float,
        default=470,
        help="seconds for the run (default 470); a step that would not fit is skipped",
    )
    ap.add_argument("--params", type=float, help="size of the synthetic model (default 1e9; 3e7 on cpu)")
    ap.add_argument("--keep", metavar="DIR", help="build the inputs in DIR and keep them")
    args = ap.parse_args()
    # Ray's workers and the zoo build import evomerge through PYTHONPATH: this checkout, installed or not
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    from evomerge.offline import go_offline

    go_offline()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = f"torch {torch.__version__}, CUDA build: {torch.version.cuda}"
        print(
            f"gpu_check: no CUDA device here ({why}); run it on a machine with an NVIDIA GPU and a CUDA build of "
            "torch, or pass --device cpu",
            file=sys.stderr,
        )
        return 2
    quick = device.type != "cuda"
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    run = Run(device, args.budget if not quick else 1e9, quick, root)
    here = os.getcwd()
    zoos = {v: start_zoo(root, v) for v in (["tiny"] if quick else ["pair", "tiny"])}
    try:
        steps(run, device, args.params or (3e7 if quick else 1e9), zoos)
    finally:
        os.chdir(here)
        for proc in zoos.values():
            if proc.poll() is None:
                proc.kill()
        print(summary(run), flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if run.failures else 0


def steps(run: Run, device, params: float, zoos: dict) -> None:
    """Every step, in order; a step whose inputs failed to build is skipped with the reason."""
    env = run.step("0 environment", 0, environment, device)
    print(json.dumps(env), flush=True)
    synthetic = run.root / "synthetic"
    shape = run.step("0 synthetic inputs", 60, build_synthetic, synthetic, params, device)
    bw = run.step("1 bandwidth", 20, bandwidth, device, synthetic) if shape else None
    run.step("2 kernels", 90, kernels, device, run.quick)
    trials = 20 if not run.quick else 8
    if shape and bw:
        run.step("3 merge", 60, merge_floor, device, synthetic, bw)
    if shape:
        models = [synthetic / m for m in FINE_TUNES]
        # budget.timeout leaves the zoo search, the split and the summary their time
        cfg = search_config("gpu-1b", synthetic / "base", models, device, trials, 0, 100, run.left() - 150)
        run.step("4 search 1B", 90, search, device, cfg, run.root / "run-1b", True)
    zoo = _ready_zoo(zoos, run.root, run)
    if zoo is None:
        run.results.append(("5 search zoo", "skipped: no zoo was built in time (see zoo-*.log)", {}))
        return
    cfg = search_config("gpu-zoo", zoo / "base", _zoo_specialists(zoo), device, trials, 1, 100, run.left() - 60)
    run.step("5 search zoo", 60, search, device, cfg, run.root / "run-zoo", False)
    run.step("6 split", 20, split, device, zoo)


def _ready_zoo(zoos: dict, root: Path, run: Run) -> Path | None:
    """The demo zoo if its build finished (waiting for it while the budget allows 90 s more), else the tiny one."""
    for variant in [v for v in ("pair", "tiny") if v in zoos]:
        proc = zoos[variant]
        while proc.poll() is None and run.left() > 120:
            time.sleep(1)
        if proc.poll() == 0:
            print(f"zoo: {variant}", flush=True)
            return root / f"zoo-{variant}"
    return None


if __name__ == "__main__":
    sys.exit(main())
