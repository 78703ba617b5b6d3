"""How long a search takes, before it starts: seconds per trial by part (merge, evaluation, refinement, overhead),
trials per hour and the night's end, from the same facts as the memory plan (headers, config.json, the tasks'
tokens) and a device's speeds. No weight is read and no model runs.

    speed = cpu_speed(num_cpus=2)             # this machine's CPUs (a 0.1 s matrix-product probe)
    speed = gpu_speed("H100", gpus=1)         # a GPU from the table (what `--gpu-kind` names)
    t = trial_time(model, tasks, speed, n_trials=100, rounds=4, steps=60)
    t.lines(n_trials=100, portfolio=6, workers=8, where="...")

The time model reads quantities only, so what makes a trial cheaper shows in it:
  merge       (inputs' bytes + the resident model's bytes) / merge bandwidth + tensors x a tensor's fixed cost
  evaluation  scored tokens (padded in batches, as lm-eval runs them) and generation prompts' tokens x forward
              FLOPs per token / FLOP/s + generation steps x max(weights' bytes / memory bandwidth, batch x FLOPs
              per token / FLOP/s) + lm-eval's host cost per request and per generation step
  refinement  rounds x steps x (3 x the refinement batch's tokens x FLOPs per token / FLOP/s + a merge's bytes /
              bandwidth + tensors x a tensor's fixed cost) / trials of the budget (a round shared by the trials)
  overhead    the search's own per-trial cost (sampler, storage, the worker's round trip)
Forward FLOPs per token: 2 x (decoder parameters + vocabulary x hidden) (the head's product; attention's
context-length term is left out: short requests).

On CPU every rate is the probe's: the constants below were fitted where the probe read PROBE_REF, on a machine
the search had to itself (bench/time_plan.py --fit: three searches of different sizes and tasks, checked within
10% on three others), and a machine the probe finds faster or slower (its cores) scales them. The probe reads a
peak, not the machine's load: a search sharing its cores with other work at the same priority takes longer than
planned (measured: 3-7x at load 12-19).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from evomerge.capacity.facts import ModelFacts, TaskFacts

# A GPU's dense bf16 FLOP/s and memory bandwidth as its vendor states them; the plan assumes a forward reaches
# GPU_MFU of the first, and a merge streams the inputs over the host link at H2D_BYTES_S per GPU.
GPUS = {
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
    "L40S": (362e12, 0.86e12),
    "A10G": (125e12, 0.6e12),
    "L4": (121e12, 0.3e12),
}
DEFAULT_GPU = "H100"
GPU_MFU = 0.35
H2D_BYTES_S = 22e9  # pinned host-to-device copies per GPU, as measured on an H100 node (bench/gpu_check.py)
# Fitted by `bench/time_plan.py --fit` on the 2-core development machine with the search alone at normal priority
# (2026-12-07 18:00-18:40 UTC; other jobs niced to the lowest autogroup priority), from three searches: the demo
# zoo, a 135M model on loglikelihood tasks, the real 135M member on generation and multiple-choice tasks; checked on
# three others (bench/README.md, the time plan). On CPU they scale with the probe; on a GPU node's host they are
# kept as they are. A machine shared with other work at the same priority runs slower than planned.
PROBE_REF = 180e9  # matmul_flops(2) on the machine the fitting searches ran on (its peak: 100 GFLOP/s a thread)
REQUEST_S = 4.5e-4  # lm-eval's host work per request (tokenizing, collating, the metric)
GEN_STEP_S = 0.077  # HF generate's per-step cost past its FLOPs, per batch (the cache, the stop checks)
TENSOR_S = 6.6e-4  # a merge's fixed cost per tensor (reading its inputs, the kernel's launch, the copy in)
REFINE_TENSOR_S = 3.8e-3  # a refinement step's fixed cost per tensor (its surrogate, its inner products)
TRIAL_OVERHEAD_S = 0.045  # the sampler, the storage, the worker's round trip
EVAL_MFU = 0.49  # an lm-eval forward on CPU against the probe's peak (one thread's peak x 1.8 on two)
REFINE_MFU = 0.87  # a refinement step's forward and backward against the probe's peak
CPU_MERGE_BYTES_S = 1.6e9  # a merge's streamed bytes per second on CPU at PROBE_REF (page cache in, model out)
GPU_GEN_STEP_S = 0.03  # a generation step's cost past its FLOPs on a GPU (HF generate's loop; assumed, not fitted)
CPU_BATCH = 64
THREAD_SCALING = 0.8  # what each thread past the first adds to a matrix product's rate


@dataclass(frozen=True)
class Speed:
    """What the time plan assumes of one worker's device(s)."""

    name: str  # for the reader: "2 CPU(s) of this machine (probe 41 GFLOP/s)", "1 x H100, 989 TFLOP/s at 35%"
    flops: float  # FLOP/s an evaluation's forward pass reaches
    memory_bytes_s: float  # weights read per generation step
    merge_bytes_s: float
    batch: int = CPU_BATCH
    refine_flops: float = 0.0  # FLOP/s of a refinement step (default: `flops`)
    host_scale: float = 1.0  # the fixed host costs' factor (REQUEST_S, TENSOR_S, ...): PROBE_REF / probe on CPU
    probe: float = 0.0  # the CPU probe's FLOP/s (0 on a GPU)


def matmul_flops(threads: int, seconds: float = 1.0) -> float:
    """The peak FLOP/s of float32 matrix products on `threads` CPU threads: one thread's best of 50 short timings
    over `seconds`, times THREAD_SCALING per further thread. The peak, not the mean: on a busy machine the share a
    process gets swings several-fold from one second to the next (measured 17-97 GFLOP/s over 0.5 s at load 15),
    so the plan reads the machine's speed and its constants carry the load they were fitted at."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 512), torch.randn(512, 512)
        a @ b  # warm up
        best = 0.0
        for _ in range(50):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 50:
                a @ b
                n += 1
            best = max(best, n * 2 * 256 * 512 * 512 / (time.perf_counter() - start))
        return best * (1 + THREAD_SCALING * (max(1, threads) - 1))
    finally:
        torch.set_num_threads(before)


def cpu_speed(num_cpus: float, where: str = "this machine") -> Speed:
    return speed_at(matmul_flops(int(num_cpus)), num_cpus, where)


def speed_at(rate: float, num_cpus: float, where: str = "this machine") -> Speed:
    """`num_cpus` CPUs whose matrix-product probe reads `rate` FLOP/s (bench/time_plan.py refits the constants
    from the rates its runs recorded)."""
    scale = rate / PROBE_REF
    return Speed(
        f"{num_cpus:g} CPU(s) of {where} (matmul probe {rate / 1e9:.0f} GFLOP/s)",
        flops=rate * EVAL_MFU,
        memory_bytes_s=CPU_MERGE_BYTES_S * scale * 4,
        merge_bytes_s=CPU_MERGE_BYTES_S * scale,
        refine_flops=rate * REFINE_MFU,
        host_scale=1 / scale,
        probe=rate,
    )


def gpu_speed(kind: str | None, gpus: float, batch: int = CPU_BATCH) -> Speed:
    """A worker on `gpus` GPUs of `kind` (the table's; DEFAULT_GPU when unknown, and the name says so). The layers
    of a split model run one GPU after another: more GPUs per worker add memory, not speed."""
    known = (kind or "").upper().replace("NVIDIA ", "").split()[0] if kind else ""
    match = next((name for name in GPUS if known.startswith(name)), None)
    name = match or DEFAULT_GPU
    flops, bandwidth = GPUS[name]
    said = f"{name}" if match else f"{name} (assumed: name yours with --gpu-kind)"
    k = max(1, math.ceil(gpus))
    return Speed(
        f"{gpus:g} x {said}, {flops / 1e12:.0f} TFLOP/s at {GPU_MFU:.0%}",
        flops=flops * GPU_MFU,
        memory_bytes_s=bandwidth,
        merge_bytes_s=H2D_BYTES_S * k,
        batch=batch,
    )


def local_gpu_kind() -> str | None:
    """The name nvidia-smi gives this machine's first GPU ("NVIDIA H100 80GB HBM3"), or None."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


@dataclass(frozen=True)
class TrialTime:
    """Seconds of one trial by part, and of the night's fixed costs."""

    merge: float
    evaluation: float
    refinement: float  # this trial's share of the budget's refinement rounds
    overhead: float
    speed: Speed

    @property
    def total(self) -> float:
        return self.merge + self.evaluation + self.refinement + self.overhead

    def night(self, n_trials: int, portfolio: int, workers: int) -> float:
        """Seconds for `n_trials` trials and the portfolio's default merges (a merge and an evaluation each) on
        `workers` workers in parallel."""
        per = self.merge + self.evaluation
        return (n_trials * self.total + portfolio * (per + self.overhead)) / max(1, workers)

    def lines(self, n_trials: int, portfolio: int, workers: int, where: str) -> list[str]:
        import datetime

        night = self.night(n_trials, portfolio, workers)
        end = datetime.datetime.now() + datetime.timedelta(seconds=night)
        per_hour = 3600 / self.total * max(1, workers)
        return [
            f"plan: time per trial on {self.speed.name}: merge {_s(self.merge)} + evaluation {_s(self.evaluation)} "
            f"+ refinement {_s(self.refinement)} + overhead {_s(self.overhead)} = {_s(self.total)}",
            f"plan: {per_hour:,.0f} trials per hour with {max(1, workers)} worker(s) on {where}: {n_trials} trials"
            + (f" and {portfolio} portfolio merges" if portfolio else "")
            + f" take ~{_duration(night)} (ends ~{end:%H:%M} if started now; staged evaluation only shortens it)",
        ]


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 0.1 else f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def forward_flops(model: ModelFacts) -> float:
    """FLOPs of one token's forward pass: the decoder layers' and the head's products."""
    return 2.0 * (model.layers * model.layer_params + model.vocab * model.hidden)


def evaluation_s(model: ModelFacts, tasks: TaskFacts, speed: Speed) -> float:
    per_token = forward_flops(model)
    scored = padded_tokens(tasks.scored_lengths, speed.batch) or tasks.scored_tokens
    forward = (scored + tasks.prompt_tokens) * per_token / speed.flops
    step_s = 0.0
    for examples, steps in tasks.generation_tasks:
        batches = math.ceil(examples / max(1, speed.batch))
        batch = min(examples, speed.batch)
        one = max(model.resident_bytes / speed.memory_bytes_s, batch * per_token / speed.flops)
        step_s += batches * steps * (one + (GEN_STEP_S * speed.host_scale if speed.probe else GPU_GEN_STEP_S))
    return forward + step_s + tasks.requests * REQUEST_S * speed.host_scale


def padded_tokens(lengths: tuple[int, ...], batch: int) -> int:
    """Tokens the model runs for requests of `lengths` in batches of `batch`, longest first, each padded to its
    longest (as lm-eval orders and pads them)."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i : i + batch]) for i in range(0, len(ordered), max(1, batch)))


def merge_s(model: ModelFacts, speed: Speed) -> float:
    bytes_s = (sum(model.input_bytes) + model.resident_bytes) / speed.merge_bytes_s
    return bytes_s + model.tensors * TENSOR_S * speed.host_scale


def refinement_s(model: ModelFacts, tasks: TaskFacts, speed: Speed, rounds: int, steps: int) -> float:
    """Seconds of all the budget's refinement rounds: per step a forward and backward pass over the refinement
    batch (3 forwards' FLOPs), the surrogate's weights written (a merge) and each tensor's fixed cost."""
    compute = 3 * tasks.refine_tokens * forward_flops(model) / (speed.refine_flops or speed.flops)
    step = compute + merge_s(model, speed) + model.tensors * REFINE_TENSOR_S * speed.host_scale
    return rounds * steps * step


def trial_time(model: ModelFacts, tasks: TaskFacts, speed: Speed, n_trials: int, rounds: int, steps: int) -> TrialTime:
    return TrialTime(
        merge=merge_s(model, speed),
        evaluation=evaluation_s(model, tasks, speed),
        refinement=refinement_s(model, tasks, speed, rounds, steps) / max(1, n_trials),
        overhead=TRIAL_OVERHEAD_S * speed.host_scale,
        speed=speed,
    )


__all__ = [
    "GPUS",
    "Speed",
    "TrialTime",
    "cpu_speed",
    "evaluation_s",
    "forward_flops",
    "gpu_speed",
    "local_gpu_kind",
    "matmul_flops",
    "merge_s",
    "padded_tokens",
    "refinement_s",
    "speed_at",
    "trial_time",
]
