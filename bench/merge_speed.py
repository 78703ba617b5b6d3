"""Merge speed: evomerge's in-memory materialization and export against mergekit-yaml and a bandwidth floor.

    .venv/bin/python bench/merge_speed.py              # ~0.5B-parameter Llama, 3 inputs, float32 (~15 min on 2 cores)
    .venv/bin/python bench/merge_speed.py --quick      # ~50M parameters, smoke run (~3 min)
    .venv/bin/python bench/merge_speed.py --methods slerp   # one method at 0.5B
    .venv/bin/python bench/merge_speed.py --dtype bfloat16 --keep /tmp/bench-bf16 --skip materialize,kernels

Builds synthetic Llama checkpoints (random base, two fine-tunes = base + small noise; config.json and the
zoo's tokenizer, so transformers and mergekit accept them) in a temp folder, then times in ONE run, each
measurement in its own process (so peak RSS does not mix; read with os.wait4):
  materialize  Materializer.apply(recipe) into the resident model, with evomerge's default kernels
               (evomerge-1): median of --repeats after one warm-up; again with EVOMERGE_KERNELS=mergekit
  export       export_recipe(recipe, DIR): what `evomerge merge RECIPE --out DIR` does, file to file
  mergekit     `.venv/bin/mergekit-yaml recipe.yaml OUT` with default options (--variants adds one run with
               the 0.1.5 memory flags --lazy-unpickle --async-write for the first method)
  floor        the bandwidth floor: bytes that must be read and written (every input once, the output
               once) / memcpy bandwidth measured here (a 1 GB tensor copy, read + write bytes counted);
               floor+write adds the time to write the output's bytes to a safetensors file
Targets (issue 19; the kernels stay pure torch, without a compiled dependency: docs/architecture.md, "Design
choices"): materialize of ties and dare_ties >= 10x faster than mergekit-yaml; export faster than mergekit-yaml
with peak RSS no higher. The floor ratios are printed for scale: the
bandwidth-floor target (a candidate within 3x of its reads and writes) is a GPU one, bench/gpu_check.py.
Inputs are in the page cache for every measurement (written just before), so this measures compute and
memory traffic, not the disk. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB = 32_000  # Llama-2's vocabulary: embed/lm_head get a realistic share of the parameters
FINE_TUNES = ("ft1", "ft2")
TARGET_SPEEDUP = 10.0  # materialize vs mergekit-yaml (ties, dare_ties)
MK_KERNELS = "materialize, mergekit kernels"

RECIPES = {
    "ties": {"parameters": {"weight": 0.5, "density": 0.5}},
    "dare_ties": {"parameters": {"weight": 0.5, "density": 0.5}},
    "slerp": {"t": 0.5},
}


# ---- synthetic checkpoints -------------------------------------------------------------------------
def llama_shape(params: float, hidden: int | None = None) -> dict:
    """A Llama config of about `params` parameters (untied embeddings, head_dim 64; `hidden` default by size)."""
    hidden = hidden or (1024 if params >= 3e8 else 512 if params >= 3e7 else 256)
    inter = round(hidden * 2.75 / 128) * 128
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(2, round((params - 2 * VOCAB * hidden - hidden) / per_layer))
    return dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=VOCAB,
    )


def build_inputs(
    root: Path,
    params: float,
    dtype_name: str,
    seed: int = 0,
    fine_tunes: tuple[str, ...] = FINE_TUNES,
    hidden: int | None = None,
) -> dict:
    """Write root/base and root/<fine-tune> for each of `fine_tunes` (model.safetensors, config.json, tokenizer).
    Returns the shape."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from evomerge.zoo.tokenizer import build_tokenizer

    dtype = getattr(torch, dtype_name)
    shape = llama_shape(params, hidden)
    tok = build_tokenizer()
    config = LlamaConfig(
        **shape,
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype=dtype_name,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for n in range(L):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
        shapes.update(
            {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
        )
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)})
    gen = torch.Generator().manual_seed(seed)
    base = {
        k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items()
    }
    models = {"base": base}
    for name in fine_tunes:  # fine-tune = base + noise of 10% of the base's scale
        models[name] = {k: (v.float() + torch.randn(v.shape, generator=gen) * 0.002).to(dtype) for k, v in base.items()}
        _write(root / name, models[name], config, tok, save_file)
        del models[name]
    _write(root / "base", base, config, tok, save_file)
    shape["params"] = sum(v.numel() for v in base.values())
    return shape


def _write(out: Path, tensors: dict, config, tok, save_file) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def write_recipe(root: Path, method: str, dtype_name: str) -> Path:
    import yaml

    base = str(root / "base")
    if method == "slerp":
        spec = {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": str(root / "ft1")}],
            "parameters": dict(RECIPES["slerp"]),
        }
    else:
        spec = {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": str(root / m), **RECIPES[method]} for m in FINE_TUNES],
        }
    spec["dtype"] = dtype_name
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- measurements (each runs in its own process: `--_measure JSON`) --------------------------------
def measure_materialize(recipe_path: str, repeats: int, dtype: str) -> dict:
    from evomerge.merge.materialize import Materializer
    from evomerge.merge.recipe import Recipe

    recipe = Recipe.load(recipe_path)
    t0 = time.perf_counter()
    mat = Materializer(recipe.input_models(), recipe.base_model, dtype=dtype)
    setup = time.perf_counter() - t0
    times = []
    for _ in range(repeats + 1):  # the first apply is a warm-up
        t0 = time.perf_counter()
        mat.apply(recipe)
        times.append(time.perf_counter() - t0)
    return {"setup": setup, "warmup": times[0], "times": times[1:]}


def measure_export(recipe_path: str, out: str) -> dict:
    from evomerge.export.export import export_recipe
    from evomerge.merge.recipe import Recipe

    recipe = Recipe.load(recipe_path)
    t0 = time.perf_counter()
    export_recipe(recipe, Path(out))
    return {"times": [time.perf_counter() - t0]}


def measure_floor(model_dirs: list[str], out: str) -> dict:
    """memcpy bandwidth, the time to write one output's bytes, and a plain weighted-sum pass for reference."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = torch.ones(2**28)  # 1 GiB
    dst = torch.empty_like(src)
    copies = []
    for _ in range(4):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    bandwidth = 2 * src.numel() * src.element_size() / min(copies[1:])
    del src, dst
    files = [safe_open(str(Path(d) / "model.safetensors"), "pt") for d in model_dirs]
    names = list(files[0].keys())
    result = {n: torch.empty_like(files[0].get_tensor(n)) for n in names}
    weight = 1.0 / len(files)
    passes = []
    for _ in range(2):  # the second pass: inputs and result touched once already
        t0 = time.perf_counter()
        for n in names:
            o = result[n]
            torch.mul(files[0].get_tensor(n), weight, out=o)
            for f in files[1:]:
                o.add_(f.get_tensor(n), alpha=weight)
        passes.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    save_file(result, str(Path(out) / "model.safetensors"))
    write = time.perf_counter() - t0
    out_bytes = sum(t.numel() * t.element_size() for t in result.values())
    return {"bandwidth": bandwidth, "write": write, "pass": passes[-1], "model_bytes": out_bytes, "times": [passes[-1]]}


def _child(spec: dict) -> None:
    kind = spec["kind"]
    if kind == "materialize":
        res = measure_materialize(spec["recipe"], spec["repeats"], spec["dtype"])
    elif kind == "export":
        res = measure_export(spec["recipe"], spec["out"])
    elif kind == "floor":
        res = measure_floor(spec["models"], spec["out"])
    elif kind == "build":
        res = build_inputs(Path(spec["root"]), spec["params"], spec["dtype"])
    else:
        raise SystemExit(f"unknown measurement {kind}")
    print("RESULT " + json.dumps(res), flush=True)


def _run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` as one process; wall time, its own peak RSS (os.wait4) and the RESULT line it printed."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}", "rss_gb": usage.ru_maxrss / 2**20}
    res = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), {"times": [wall]})
    res["rss_gb"] = usage.ru_maxrss / 2**20  # KiB on Linux
    res["wall"] = wall
    return res


def _measure(spec: dict, root: Path, tag: str, env: dict | None = None) -> dict:
    return _run([sys.executable, __file__, "--_measure", json.dumps(spec)], root / f"{tag}.log", env)


# ---- the run ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=5e8, help="approximate parameter count (default 5e8)")
    ap.add_argument("--quick", action="store_true", help="~50M parameters, 2 repeats: a smoke run")
    ap.add_argument("--methods", default="ties,dare_ties,slerp", help="comma-separated (default ties,dare_ties,slerp)")
    ap.add_argument("--repeats", type=int, help="timed applies after the warm-up (default 3; 1 from 2e8 params)")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also time mergekit-yaml --lazy-unpickle --async-write (first method only)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--skip", default="", help="comma-separated measurements to skip: materialize,kernels,export,mergekit,floor"
    )
    ap.add_argument("--keep", metavar="DIR", help="build the inputs in DIR and keep them (reused if present)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        _child(json.loads(args._measure))
        return 0
    if args.quick:
        args.params = 5e7
    if args.repeats is None:
        args.repeats = 3 if args.params < 2e8 else 1
    methods = [m for m in args.methods.split(",") if m]
    skip = set(args.skip.split(",")) - {""}
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    try:
        return _bench(root, args, methods, skip)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _bench(root: Path, args, methods: list[str], skip: set[str]) -> int:
    import platform

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stamp = root / "shape.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("request") == [args.params, args.dtype]:
        shape = json.loads(stamp.read_text())["shape"]
    else:
        # In a child: on Linux a child's peak RSS starts at its parent's RSS when it was forked (exec folds
        # the copied address space into ru_maxrss), so a parent holding the built weights would inflate
        # every measurement after it.
        built = _measure(
            {"kind": "build", "root": str(root), "params": args.params, "dtype": args.dtype}, root, "build"
        )
        if "error" in built:
            raise SystemExit(f"building the inputs failed: {built['error']}")
        shape = {k: v for k, v in built.items() if k not in ("rss_gb", "wall")}
        stamp.write_text(json.dumps({"request": [args.params, args.dtype], "shape": shape}))
    gb = shape["params"] * {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype] / 1e9
    print(
        f"inputs: 3 x {shape['params'] / 1e6:.0f}M params ({shape['num_hidden_layers']} layers, hidden "
        f"{shape['hidden_size']}, vocab {shape['vocab_size']}, {args.dtype}, {gb:.2f} GB each), built in "
        f"{time.perf_counter() - t0:.0f} s in {root}",
        flush=True,
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )

    results: dict[str, dict[str, dict]] = {}
    mergekit = str(Path(sys.executable).parent / "mergekit-yaml")  # the environment running this bench
    for n_inputs in sorted({2 if m == "slerp" else 3 for m in methods}):
        if "floor" in skip:
            break
        dirs = [str(root / "base"), *[str(root / m) for m in FINE_TUNES]][:n_inputs]
        out = root / "out-floor"
        out.mkdir(exist_ok=True)
        results[f"floor/{n_inputs}"] = {
            "floor": _measure({"kind": "floor", "models": dirs, "out": str(out)}, root, f"floor{n_inputs}")
        }
        shutil.rmtree(out, ignore_errors=True)
        _progress(f"floor/{n_inputs}", results[f"floor/{n_inputs}"])
    for i, method in enumerate(methods):
        recipe = write_recipe(root, method, args.dtype)
        row: dict[str, dict] = {}
        if "materialize" not in skip:
            spec = {"kind": "materialize", "recipe": str(recipe), "repeats": args.repeats, "dtype": args.dtype}
            row["materialize"] = _measure(spec, root, f"mat-{method}")
            if "kernels" not in skip:  # the same, with mergekit's kernels instead of evomerge/merge/kernels.py
                row[MK_KERNELS] = _measure(spec, root, f"matmk-{method}", env={"EVOMERGE_KERNELS": "mergekit"})
        if "export" not in skip:
            out = root / f"out-export-{method}"
            shutil.rmtree(out, ignore_errors=True)
            row["export"] = _measure({"kind": "export", "recipe": str(recipe), "out": str(out)}, root, f"exp-{method}")
            shutil.rmtree(out, ignore_errors=True)  # keep the page cache for the inputs
        if "mergekit" not in skip:
            out = root / f"out-mergekit-{method}"
            shutil.rmtree(out, ignore_errors=True)
            row["mergekit"] = _run([mergekit, str(recipe), str(out), "--quiet"], root / f"mk-{method}.log")
            shutil.rmtree(out, ignore_errors=True)
            if i == 0 and args.variants:
                row["mergekit --lazy-unpickle --async-write"] = _run(
                    [mergekit, str(recipe), str(out), "--quiet", "--lazy-unpickle", "--async-write"],
                    root / f"mk2-{method}.log",
                )
                shutil.rmtree(out, ignore_errors=True)
        results[method] = row
        _progress(method, row)
    print()
    print(report(results, methods))
    print(f"load average {os.getloadavg()[0]:.2f} at the end (2 cores: above ~0.5 means other work ran beside this)")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "dtype": args.dtype, "results": results}, indent=2))
    return 0


def _progress(tag: str, row: dict) -> None:
    parts = [f"{k} {'ERROR' if 'error' in v else f'{_t(v):.2f}s'}" for k, v in row.items()]
    print(f"  {tag}: " + ", ".join(parts), flush=True)
    for k, v in row.items():
        if "error" in v:
            print(f"    {k}: {v['error']}", file=sys.stderr)


def _t(res: dict) -> float:
    return statistics.median(res["times"])


def floors(measured: dict, n_inputs: int) -> tuple[float, float] | None:
    """(floor, floor + write) in seconds: (inputs + output) bytes / memcpy bandwidth, plus the write."""
    if not measured or "error" in measured:
        return None
    floor = (n_inputs + 1) * measured["model_bytes"] / measured["bandwidth"]
    return floor, floor + measured["write"]


def report(results: dict, methods: list[str]) -> str:
    head = f"{'method':<10} {'measurement':<40} {'time s':>8} {'peak RSS MB':>11} {'vs mergekit':>11} {'vs floor':>9}"
    lines = [head, "-" * len(head)]
    verdicts = []
    for method in methods:
        n_inputs = 2 if method == "slerp" else 3
        row = results.get(method, {})
        measured = results.get(f"floor/{n_inputs}", {}).get("floor")
        fl = floors(measured, n_inputs)
        mk = row.get("mergekit")
        mk_t = _t(mk) if mk and "error" not in mk else None
        for name, res in row.items():
            if "error" in res:
                lines.append(f"{method:<10} {name:<40} {'ERROR':>8}")
                continue
            t = _t(res)
            ref = (fl[1] if name == "export" or name.startswith("mergekit") else fl[0]) if fl else None
            vs_mk = f"{mk_t / t:.1f}x" if mk_t and not name.startswith("mergekit") else ""
            vs_floor = f"{t / ref:.1f}" if ref else ""
            label = name + (" (median)" if name.startswith("materialize") else "")
            lines.append(f"{method:<10} {label:<40} {t:>8.2f} {res['rss_gb'] * 1024:>11,.0f} {vs_mk:>11} {vs_floor:>9}")
            if name.startswith("materialize"):
                lines.append(f"{method:<10} {'  setup, once per worker (load, build)':<40} {res['setup']:>8.2f}")
        if fl:
            lines.append(
                f"{method:<10} {'floor; floor + write':<40} {fl[0]:>8.2f} {'':>11} {'':>11} "
                f"({measured['bandwidth'] / 1e9:.1f} GB/s memcpy; write {measured['write']:.2f} s; "
                f"plain weighted-sum pass {measured['pass']:.2f} s)"
            )
            lines.append(f"{method:<10} {'':<40} {fl[1]:>8.2f}")
        mat, exp, slow = row.get("materialize"), row.get("export"), row.get(MK_KERNELS)
        ok = lambda r: r is not None and "error" not in r  # noqa: E731
        if ok(mat) and ok(slow):
            verdicts.append(
                f"{method}: evomerge-1 kernels {_t(slow) / _t(mat):.1f}x faster than mergekit's in the same "
                "materializer"
            )
        if ok(mat) and mk_t and method != "slerp":
            speed = mk_t / _t(mat)
            verdicts.append(
                f"{method}: materialize {speed:.1f}x faster than mergekit-yaml (target >= "
                f"{TARGET_SPEEDUP:.0f}x: {'met' if speed >= TARGET_SPEEDUP else 'MISSED'})"
            )
        if ok(mat) and fl:
            verdicts.append(f"{method}: materialize {_t(mat) / fl[0]:.1f}x the bandwidth floor (for scale)")
        if ok(exp) and ok(mk):
            faster, lower = _t(exp) < _t(mk), exp["rss_gb"] <= mk["rss_gb"]
            verdicts.append(
                f"{method}: export {_t(exp):.1f} s vs mergekit-yaml {_t(mk):.1f} s "
                f"(target faster: {'met' if faster else 'MISSED'}); peak RSS {exp['rss_gb'] * 1024:,.0f} MB vs "
                f"{mk['rss_gb'] * 1024:,.0f} MB (target <=: {'met' if lower else 'MISSED'})"
            )
        if ok(exp) and fl:
            verdicts.append(f"{method}: export {_t(exp) / fl[1]:.1f}x floor+write (for scale)")
    lines.append("")
    lines.append(
        "vs mergekit = mergekit-yaml time / this time; vs floor = this time / floor (export and mergekit-yaml "
        "against floor + write)."
    )
    return "\n".join(lines + [""] + verdicts)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
