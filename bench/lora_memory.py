"""LoRA inputs kept low rank: a search's peak RSS over a base + two PEFT adapters, against the same search over the
adapters merged into full checkpoints.

    .venv/bin/python bench/lora_memory.py                 # ~150M-parameter Llama, float32, r 16 (~10 min on 2 cores)
    .venv/bin/python bench/lora_memory.py --params 5e7    # smaller, a smoke run
    .venv/bin/python bench/lora_memory.py --keep /tmp/lora-bench --trials 4 --workers 1

Writes a synthetic Llama base (bench/merge_speed.py's: random weights, the zoo's character tokenizer), two LoRA
adapters of it made with peft (get_peft_model on every linear layer, B drawn at random as a trained adapter's would
be; save_pretrained), and the same adapters merged into full checkpoints with peft's merge_and_unload (what a user
without adapter support does first, and what mergekit does in its LoRA cache). Then runs the same search twice,
each `evomerge search` in its own process, and reads that process's peak RSS with os.wait4:

  adapters   models: [lora_a, lora_b] (each merges over base_model; the worker maps the base once)
  full       models: [merged_a, merged_b] (three full checkpoints mapped)

The search: task_arithmetic (the default space: a weight per model, layer group and kind), `--trials` trials on a
4-example zoo task, refinement, staged evaluation and the portfolio off (the same work in both runs; today's
refinement holds dense task vectors, which issue 19 bounds). `--workers 0` (the default) runs the worker in the
search process, so its peak RSS is the worker's; `--workers 1` puts it in a Ray actor (then the figure is the
driver's, and the actor's is read from /proc while it runs). Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def build(root: Path, params: float, rank: int, seed: int = 0) -> dict:
    """root/base (merge_speed's synthetic Llama), root/lora_{a,b} (peft adapters), root/merged_{a,b} (merged)."""
    import torch
    from merge_speed import FINE_TUNES, build_inputs
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = build_inputs(root, params, "float32", seed)
    for name in FINE_TUNES:  # only the base is used here
        shutil.rmtree(root / name)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, tag in enumerate("ab"):
        model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        gen = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero; a trained adapter's is not
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        peft_model.save_pretrained(root / f"lora_{tag}")
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(root / f"merged_{tag}")
        shutil.copy(root / "base" / "tokenizer.json", root / f"merged_{tag}")
        shutil.copy(root / "base" / "tokenizer_config.json", root / f"merged_{tag}")
        del model, peft_model, merged
    shape["adapter_mb"] = (root / "lora_a" / "adapter_model.safetensors").stat().st_size / 1e6
    shape["model_mb"] = (root / "base" / "model.safetensors").stat().st_size / 1e6
    return shape


def config(root: Path, models: list[str], name: str, trials: int, workers: int) -> Path:
    import yaml

    data = {
        "name": name,
        "base_model": str(root / "base"),
        "models": [str(root / m) for m in models],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "metric": "acc", "subset": 4}]},
        "budget": {"n_trials": trials},
        "workers": {"count": workers, "num_cpus": 2},
        "refine": None,
        "early_stop": None,
        "portfolio": False,
        "dtype": "float32",
        "storage": f"sqlite:///{root / name}.db",
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _actor_rss(pid: int, peak: dict) -> None:
    """The largest VmHWM among the search's descendant processes (a Ray actor), polled while it runs."""
    while True:
        try:
            children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        except OSError:
            return
        stack = list(children)
        while stack:
            child = stack.pop()
            stack += subprocess.run(["pgrep", "-P", child], capture_output=True, text=True).stdout.split()
            try:
                for line in Path(f"/proc/{child}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak["actor"] = max(peak.get("actor", 0), int(line.split()[1]))
            except OSError:
                pass
        if peak.get("done"):
            return
        time.sleep(0.5)


def search(cfg: Path, root: Path, tag: str) -> dict:
    """`evomerge search CFG` as one process: wall seconds and its peak RSS (os.wait4; the actor's if Ray)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = root / f"{tag}.log"
    start = time.perf_counter()
    peak: dict = {}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evomerge", "search", str(cfg)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
        )
        watcher = threading.Thread(target=_actor_rss, args=(proc.pid, peak), daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        peak["done"] = True
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tag}: search failed; see {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return {
        "wall_s": time.perf_counter() - start,
        "rss_gb": usage.ru_maxrss / 2**20,
        "actor_gb": peak.get("actor", 0) / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.5e8, help="base model parameters (default 1.5e8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--trials", type=int, default=3, help="trials per search (default 3)")
    parser.add_argument("--workers", type=int, default=0, help="0: in-process worker (default); 1: a Ray actor")
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temp folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / "lora_b").is_dir():
            shape = build(root, args.params, args.rank)
            (root / "shape.json").write_text(json.dumps(shape))
        shape = json.loads((root / "shape.json").read_text())
        print(
            f"base: {shape['params'] / 1e6:.0f}M parameters ({shape['model_mb']:.0f} MB float32, "
            f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}); "
            f"each adapter: r {args.rank} on every linear layer, {shape['adapter_mb']:.1f} MB"
        )
        figures = {}
        for tag, models in (("adapters", ["lora_a", "lora_b"]), ("full", ["merged_a", "merged_b"])):
            shutil.rmtree(root / "runs", ignore_errors=True)
            cfg = config(root, models, f"bench_{tag}", args.trials, args.workers)
            (root / f"bench_{tag}.db").unlink(missing_ok=True)
            figures[tag] = search(cfg, root, tag)
            where = f"; Ray actor's peak RSS {figures[tag]['actor_gb']:.2f} GB" if args.workers else ""
            print(
                f"{tag:>9}: search process peak RSS {figures[tag]['rss_gb']:.2f} GB{where}, "
                f"{args.trials} trials in {figures[tag]['wall_s']:.0f} s"
            )
        key = "actor_gb" if args.workers else "rss_gb"
        saved = figures["full"][key] - figures["adapters"][key]
        print(
            f"adapters / full peak RSS: {figures['adapters'][key] / figures['full'][key]:.2f} "
            f"({saved:.2f} GB less; two full models are {2 * shape['model_mb'] / 1e3:.2f} GB)"
        )
        print("RESULT " + json.dumps({"shape": shape, **figures}))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
