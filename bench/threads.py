"""CPU thread discipline: two torch processes side by side, without and with it.

    .venv/bin/python bench/threads.py                 # ~3 min on 2 cores; run it on an otherwise idle machine
    .venv/bin/python bench/threads.py --seconds 5     # a shorter workload

The workload is what evomerge's CPU processes mostly do besides merging: forward passes of a small
Llama (the demo zoo's shape, a batch of 32 x 64 tokens), many short parallel ops. Each run is a fresh
process (OpenMP reads its environment when torch loads it); its wall time is compared with the same
workload run alone with torch's defaults:

  defaults    torch's defaults: an OpenMP pool as wide as the machine, libgomp's default wait policy
              (idle threads spin for a while before they sleep)
  passive     OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once), pool as wide as the machine: what two
              `evomerge` commands started side by side do (each was given the whole machine)
  discipline  PASSIVE, and each process given its share of the cores (taskset) with torch's threads
              sized to it: what evomerge's Ray actors (num_cpus) and a CLI under taskset do

Target (issue 11): two processes side by side each within about 2.5x of running alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("defaults", "passive", "discipline")


def workload(iterations: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=45,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 45, (32, 64))
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(iterations):
            model(ids)
    return time.perf_counter() - t0


def _env(mode: str, cores: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    if mode in ("passive", "discipline"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if mode == "discipline":
        env["OMP_NUM_THREADS"] = str(cores)
    return env


def _launch(mode: str, iterations: int, slot: int, share: int) -> subprocess.Popen:
    """One workload process; `share` cores starting at core slot*share under the discipline."""
    cmd = [sys.executable, __file__, "--_child", str(iterations)]
    if mode == "discipline":
        first = (slot * share) % (os.cpu_count() or 1)
        cmd = ["taskset", "-c", ",".join(str(first + i) for i in range(share)), *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env(mode, share), cwd=REPO)


def _times(procs: list[subprocess.Popen]) -> list[float]:
    out = []
    for p in procs:
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"workload failed (exit {p.returncode})")
        out.append(json.loads(text.strip().splitlines()[-1])["seconds"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the workload alone (default 10)")
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child is not None:
        print(json.dumps({"seconds": workload(args._child)}), flush=True)
        return 0
    cores = os.cpu_count() or 1
    share = max(1, cores // 2)
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    probe = _times([_launch("defaults", 20, 0, cores)])[0]
    iterations = max(20, int(20 * args.seconds / probe))
    alone = min(_times([_launch("defaults", iterations, 0, cores)]) for _ in range(2))[0]
    print(f"workload: {iterations} forward passes; alone with torch's defaults {alone:.2f} s", flush=True)
    print(f"{'mode':<11} {'alone s':>8} {'pair s (each)':>16} {'pair / alone':>13} {'pair / defaults alone':>22}")
    for mode in MODES:
        cores_each = share if mode == "discipline" else cores
        solo = alone if mode == "defaults" else _times([_launch(mode, iterations, 0, cores_each)])[0]
        pair = _times([_launch(mode, iterations, i, cores_each) for i in range(2)])
        worst = max(pair)
        print(
            f"{mode:<11} {solo:>8.2f} {pair[0]:>7.2f} {pair[1]:>7.2f} {worst / solo:>12.1f}x {worst / alone:>21.1f}x "
            f"{'(within 2.5x)' if worst / solo <= 2.5 else '(over 2.5x)'}",
            flush=True,
        )
    print(
        f"load average {os.getloadavg()[0]:.2f} at the end. pair / alone: the slower of the two over the same "
        "workload alone in the same mode; pair / defaults alone: over it alone with torch's defaults"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
