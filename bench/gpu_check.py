"""GPU check: evomerge-1 merges give the same bits on a GPU as on the CPU, and how fast they are there.

    .venv/bin/python bench/gpu_check.py                  # on a machine with an NVIDIA GPU (~1 min)
    .venv/bin/python bench/gpu_check.py --device cpu     # no GPU: run the same checks CPU against CPU (smoke)

1. Kernels: every sparsifying method (counter-based masks included) and the elementwise deterministic
   ones (linear, task_arithmetic), float32 and bfloat16, on tensors of several shapes: the merge on the
   device must equal the CPU merge bit for bit (asserted). SLERP's norms are reductions whose order differs
   on a GPU, so its difference is printed, not asserted.
2. Where the model lives: `Materializer(device=...)` merges a synthetic ~50M-parameter Llama on the device
   (inputs copied from the memory-mapped files, kernels writing into the parameters); its weights must equal
   `export_recipe`'s CPU checkpoint bit for bit for ties and dare_ties (asserted), and the apply time is
   printed beside the CPU's.
Exit 0 when everything matched, 1 on a mismatch, 2 when there is no such device.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
SHAPES = [(4096,), (1000, 1000), (5632, 2048)]
INPUTS = ["base", "a", "b"]


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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_kernels(device) -> int:
    import torch

    from evomerge.merge.materialize import merge_tensor

    failures = 0
    print(f"{'method':<17} {'dtype':<9} {'shape':<13} {'cpu ms':>8} {'device ms':>10}  same bits")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            g = torch.Generator().manual_seed(len(shape))
            base = torch.randn(shape, generator=g) * 0.02
            tensors = [base] + [
                base + (torch.randn(shape, generator=g) * 0.002 / 1e-4).round() * 1e-4 for _ in range(2)
            ]
            tensors = [t.to(dtype) for t in tensors]
            there = [t.to(device) for t in tensors]
            methods = list(SPARSIFYING) + ["slerp"]
            for name in methods:
                method, params = _params(name)
                ins, base_id = (INPUTS[:2], "base") if name == "slerp" else (INPUTS, "base")
                if name == "slerp":
                    params.shared["t"] = 0.4
                t0 = time.perf_counter()
                cpu = merge_tensor(method, params, tensors[: len(ins)], ins, base_id, seed=3, kernels="evomerge-1")
                t1 = time.perf_counter()
                merge_tensor(method, params, there[: len(ins)], ins, base_id, seed=3, kernels="evomerge-1")  # warm-up
                _sync(device)
                t2 = time.perf_counter()
                dev = merge_tensor(method, params, there[: len(ins)], ins, base_id, seed=3, kernels="evomerge-1")
                _sync(device)
                t3 = time.perf_counter()
                same = torch.equal(
                    cpu.view(torch.uint8) if cpu.dtype != torch.bfloat16 else cpu.view(torch.int16),
                    dev.cpu().view(torch.uint8) if cpu.dtype != torch.bfloat16 else dev.cpu().view(torch.int16),
                )
                note = "yes" if same else f"NO (max diff {(cpu.double() - dev.cpu().double()).abs().max().item():.3g})"
                if name == "slerp":
                    note += " (not asserted: reductions)"
                elif not same:
                    failures += 1
                print(
                    f"{name:<17} {str(dtype)[6:]:<9} {str(tuple(shape)):<13} {(t1 - t0) * 1e3:>8.1f} "
                    f"{(t3 - t2) * 1e3:>10.1f}  {note}",
                    flush=True,
                )
    return failures


def check_materializer(device, root: Path) -> int:
    import torch
    import yaml
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "bench"))
    from merge_speed import build_inputs

    from evomerge.export import export_recipe
    from evomerge.merge.materialize import Materializer
    from evomerge.recipe import Recipe

    build_inputs(root, 5e7, "float32")
    failures = 0
    for method in ("ties", "dare_ties"):
        spec = {
            "merge_method": method,
            "base_model": str(root / "base"),
            "models": [{"model": str(root / m), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("ft1", "ft2")],
            "dtype": "float32",
            "evomerge": {"seed": 1, "kernels": "evomerge-1"},
        }
        (root / f"{method}.yaml").write_text(yaml.safe_dump(spec))
        recipe = Recipe.load(root / f"{method}.yaml")
        exported = load_file(str(export_recipe(recipe, root / f"out-{method}") / "model.safetensors"))
        times = {}
        for where in ("cpu", str(device)):
            mat = Materializer(recipe.input_models(), recipe.base_model, dtype="float32", device=where)
            mat.apply(recipe)  # warm-up
            _sync(torch.device(where))
            t0 = time.perf_counter()
            mat.apply(recipe)
            _sync(torch.device(where))
            times[where] = time.perf_counter() - t0
            state = mat.model.state_dict()
            bad = [k for k, v in exported.items() if not torch.equal(state[k].cpu(), v)]
            if bad:
                failures += 1
                print(
                    f"{method}: resident model on {where} differs from the CPU export at {len(bad)} tensors, e.g. "
                    f"{bad[0]}"
                )
            del mat, state
        print(
            f"{method}: Materializer.apply on cpu {times['cpu']:.2f} s, on {device} {times[str(device)]:.2f} s; "
            f"resident weights == CPU export: {'yes' if not failures else 'NO'}",
            flush=True,
        )
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a smoke run without a GPU")
    args = ap.parse_args()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
            "or pass --device cpu for a smoke run",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    failures = check_kernels(device)
    with tempfile.TemporaryDirectory(prefix="evomerge-gpu-check-") as tmp:
        failures += check_materializer(device, Path(tmp))
    print("all evomerge-1 results equal on the device and the CPU" if not failures else f"{failures} MISMATCH(ES)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
