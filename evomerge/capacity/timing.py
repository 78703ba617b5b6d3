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
  subspace    (tsv_m, iso_c, iso_cts: merge/kernels/subspace.py) their SVDs and products per weight matrix
              (`subspace_work`), on one CPU thread in float32 whatever the worker's device, at SVD_EFFICIENCY of
              one thread's matrix-product peak, + SVD_CALL_S an SVD (+ TSV-M's digests of its inputs' matrices at
              DIGEST_BYTES_S): in the merge term (and each portfolio merge by its own method),
              TSV-M's per-task SVDs once per worker while they fit its cache (SVD_CACHE_BYTES), each trial past it
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
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.capacity.facts import ModelFacts, TaskFacts, gb

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
# The subspace merges' SVDs run on one CPU thread in float32, on a GPU worker too. A thin SVD of an m x n matrix
# (k = min(m, n)) costs about 4 m n k + 8 k^3 FLOPs (`svd_flops`); LAPACK's float32 SVD (and the products beside it)
# reaches SVD_EFFICIENCY of one thread's probe (single SVDs of 128 x 128 to 1536 x 576 read 0.13-0.32; whole merges
# at SmolLM2-135M's shapes, bench/subspace_cost.py, 0.19-0.28 by method; 2 busy cores, load 4-10, 2026-12-07).
SVD_EFFICIENCY = 0.25
SVD_CALL_S = 0.5e-3  # each SVD's fixed cost at one thread of PROBE_REF (LAPACK's set-up, Python; tiny zoo: 0.25-2 ms)
DIGEST_BYTES_S = 0.5e9  # TSV-M's cache keys: blake2b of each input matrix's bytes every merge (measured 0.48 GB/s)
SUBSPACE_METHODS = ("tsv_m", "iso_c", "iso_cts")


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
    svd_flops: float = 0.0  # FLOP/s of the subspace merges' SVDs (one CPU thread, float32)
    svd_where: str = ""  # for the reader: "one CPU thread of this machine (probe 60 GFLOP/s)"


def matmul_flops(threads: int, seconds: float = 1.0) -> float:
    """The peak FLOP/s of float32 matrix products on `threads` CPU threads: one thread's best of 50 short timings
    over `seconds`, times THREAD_SCALING per further thread. The peak, not the mean: on a busy machine the share a
    process gets swings several-fold from one second to the next (measured 17-97 GFLOP/s over 0.5 s at load 15),
    so the plan reads the machine's speed, and its constants assume the search has the machine to itself."""
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
    one = rate / (1 + THREAD_SCALING * (max(1, int(num_cpus)) - 1))  # the probe's one thread
    return Speed(
        f"{num_cpus:g} CPU(s) of {where} (matmul probe {rate / 1e9:.0f} GFLOP/s)",
        flops=rate * EVAL_MFU,
        memory_bytes_s=CPU_MERGE_BYTES_S * scale * 4,
        merge_bytes_s=CPU_MERGE_BYTES_S * scale,
        refine_flops=rate * REFINE_MFU,
        host_scale=1 / scale,
        probe=rate,
        svd_flops=one * SVD_EFFICIENCY,
        svd_where=f"one CPU thread of {where} (probe {one / 1e9:.0f} GFLOP/s)",
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
    one = PROBE_REF / (1 + THREAD_SCALING)  # the fitting machine's thread: the GPU node's host is not probed
    return Speed(
        f"{gpus:g} x {said}, {flops / 1e12:.0f} TFLOP/s at {GPU_MFU:.0%}",
        flops=flops * GPU_MFU,
        memory_bytes_s=bandwidth,
        merge_bytes_s=H2D_BYTES_S * k,
        batch=batch,
        svd_flops=one * SVD_EFFICIENCY,
        svd_where=f"one CPU thread of the GPU node's host (assumed {one / 1e9:.0f} GFLOP/s peak, as fitted)",
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

    merge: float  # the subspace methods' SVDs included (`subspace`)
    evaluation: float
    refinement: float  # this trial's share of the budget's refinement rounds
    overhead: float
    speed: Speed
    method: str = "task_arithmetic"
    subspace: float = 0.0  # of `merge`: the searched method's SVDs and products each trial
    setup: float = 0.0  # once per worker, before its first trial: TSV-M's per-task SVDs that its cache keeps
    svd_cache: tuple[int, int] = (0, 0)  # TSV-M: (bytes its cache keeps, bytes every per-task SVD would take)
    portfolio: tuple[tuple[str, float], ...] = ()  # each portfolio merge by its method: merge + evaluation + overhead

    @property
    def total(self) -> float:
        return self.merge + self.evaluation + self.refinement + self.overhead

    def night(self, n_trials: int, portfolio: int, workers: int) -> float:
        """Seconds for `n_trials` trials and the portfolio's default merges (a merge and an evaluation each, by
        its own method where `self.portfolio` names them; at least the longest one) on `workers` workers in
        parallel, and each worker's setup (in parallel too)."""
        return n_trials * self.total / max(1, workers) + self.portfolio_s(portfolio, workers) + self.setup

    def portfolio_s(self, portfolio: int, workers: int) -> float:
        """Seconds of the portfolio's first `portfolio` default merges on `workers` workers: their sum shared out,
        and never less than the longest of them (one worker merges it)."""
        if not self.portfolio:
            return portfolio * (self.merge - self.subspace + self.evaluation + self.overhead) / max(1, workers)
        each = [seconds for _, seconds in self.portfolio[:portfolio]]
        return max(sum(each) / max(1, workers), max(each, default=0.0))

    def lines(self, n_trials: int, portfolio: int, workers: int, where: str) -> list[str]:
        import datetime

        night = self.night(n_trials, portfolio, workers)
        end = datetime.datetime.now() + datetime.timedelta(seconds=night)
        per_hour = 3600 / self.total * max(1, workers)
        return [
            f"plan: time per trial on {self.speed.name}: merge {_s(self.merge)} + evaluation {_s(self.evaluation)} "
            f"+ refinement {_s(self.refinement)} + overhead {_s(self.overhead)} = {_s(self.total)}",
            *self._subspace_lines(portfolio),
            f"plan: {per_hour:,.0f} trials per hour with {max(1, workers)} worker(s) on {where}: {n_trials} trials"
            + (f" and {portfolio} portfolio merge{'s' * (portfolio != 1)}" if portfolio else "")
            + f" take ~{_duration(night)} (ends ~{end:%H:%M} if started now; staged evaluation only shortens it)",
        ]

    def _subspace_lines(self, portfolio: int) -> list[str]:
        """What the subspace merges add: the searched method's SVDs (TSV-M's cache), the portfolio's by method."""
        out = []
        if self.method in SUBSPACE_METHODS:
            line = f"plan: {self.method}'s SVDs on {self.speed.svd_where}: {_long(self.subspace)} of each merge"
            if self.method == "tsv_m":
                kept, wanted = self.svd_cache
                line += (
                    f", and {_long(self.setup)} once per worker for the per-task SVDs its cache keeps ({gb(kept)} of "
                    f"{gb(wanted)}" + ("; the rest are recomputed every trial)" if kept < wanted else ")")
                )
            out.append(line)
        shown = self.portfolio[:portfolio]
        if any(name in SUBSPACE_METHODS for name, _ in shown):
            own = [f"{name} {_long(seconds)}" for name, seconds in shown if name in SUBSPACE_METHODS]
            rest = [seconds for name, seconds in shown if name not in SUBSPACE_METHODS]
            others = f", {len(rest)} other(s) {_s(max(rest))} each at most" if rest else ""
            out.append(
                f"plan: the portfolio's default merges, each a merge + an evaluation by its own method (SVDs on "
                f"{self.speed.svd_where}): {', '.join(own)}{others}"
            )
        return out


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 0.1 else f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def _long(seconds: float) -> str:
    """Seconds as `_s` writes them, and in minutes or hours past ten minutes."""
    return _s(seconds) if seconds < 600 else _duration(seconds)


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
    scored = padded_tokens(tasks.scored_lengths, speed.batch, tasks.scored_shared) or tasks.scored_tokens
    forward = (scored + tasks.prompt_tokens) * per_token / speed.flops
    step_s = 0.0
    for examples, steps in tasks.generation_tasks:
        batches = math.ceil(examples / max(1, speed.batch))
        batch = min(examples, speed.batch)
        one = max(model.resident_bytes / speed.memory_bytes_s, batch * per_token / speed.flops)
        step_s += batches * steps * (one + (GEN_STEP_S * speed.host_scale if speed.probe else GPU_GEN_STEP_S))
    return forward + step_s + tasks.requests * REQUEST_S * speed.host_scale


def padded_tokens(lengths: tuple[int, ...], batch: int, shared: tuple[tuple[int, int], ...] = ()) -> int:
    """Tokens the model runs for requests of `lengths` in batches of `batch`, longest first, each padded to its
    longest (as lm-eval orders and pads them); with `shared` ((task, prefix) per request), a batch of one task's
    requests runs their common prefix once (scoring/lm.py, from SHARED_PREFIX_MIN tokens)."""
    from evomerge.scoring.prefix import SHARED_PREFIX_MIN

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    total = 0
    for start in range(0, len(order), max(1, batch)):
        rows = order[start : start + batch]
        total += lengths[rows[0]] * len(rows)
        if shared and len(rows) > 1 and len({shared[i][0] for i in rows}) == 1:
            prefix = min(shared[rows[0]][1], min(lengths[i] for i in rows) - 1)
            total -= (len(rows) - 1) * prefix if prefix >= SHARED_PREFIX_MIN else 0
    return total


def merge_s(model: ModelFacts, speed: Speed, method: str = "task_arithmetic") -> float:
    """One merge: the bytes it streams, each tensor's fixed cost and, for a subspace method, its SVDs each merge
    (`subspace_s`; TSV-M's cached per-task SVDs are not in it: they are paid once per worker)."""
    bytes_s = (sum(model.input_bytes) + model.resident_bytes) / speed.merge_bytes_s
    return bytes_s + model.tensors * TENSOR_S * speed.host_scale + subspace_s(model, speed, method)[0]


def svd_flops(m: int, n: int) -> float:
    """FLOPs of the thin SVD of an m x n matrix (k = min(m, n)): about 4 m n k + 8 k^3."""
    k = min(m, n)
    return 4.0 * m * n * k + 8.0 * k**3


def task_svd_bytes(m: int, n: int) -> int:
    """Bytes of one thin SVD kept in TSV-M's cache: float32 U (m x k), S (k), V^T (k x n)."""
    k = min(m, n)
    return (m * k + k + k * n) * 4


@dataclass(frozen=True)
class SubspaceWork:
    """A subspace merge's FLOPs on one CPU thread: `per_merge` in every merge, `once` in a worker's first (TSV-M's
    per-task SVDs its cache keeps); `cached`, `wanted`: the bytes its cache keeps and all its SVDs would take."""

    per_merge: float = 0.0
    once: float = 0.0
    cached: int = 0
    wanted: int = 0
    calls: int = 0  # SVDs every merge
    calls_once: int = 0  # SVDs once per worker


def subspace_work(model: ModelFacts, method: str) -> SubspaceWork:
    """The SVDs and products of a merge by `method` over every weight matrix (`ModelFacts.weight_matrices`), as
    merge/kernels/subspace.py runs them with T = models task vectors, r = min(m, n):
      iso_c    the SVD of the sum, and sigma_bar U V^T (2 m n r)
      iso_cts  the SVD of the sum and of each task's residual (1 + T of m x n), the residuals' projections
               (4 m n r each), the two orthogonalisations (SVDs of m x r and n x r and their P Q^T) and the product
      tsv_m    the two orthogonalisations and the product each merge (at the space's default rank fractions the
               kept directions fill r); each task's SVD once per worker while the cache (SVD_CACHE_BYTES, filled in
               merge order) holds it, else every merge
    Anything else: none."""
    from evomerge.merge.kernels.subspace import SVD_CACHE_BYTES

    if method not in SUBSPACE_METHODS:
        return SubspaceWork()
    tasks = max(1, model.n_inputs - 1)
    per = once = 0.0
    cached = wanted = calls = calls_once = 0
    for m, n in model.weight_matrices:
        r = min(m, n)
        product = 2.0 * m * n * r
        polars = svd_flops(m, r) + svd_flops(n, r) + 2.0 * (m + n) * r * r
        if method == "iso_c":
            per, calls = per + svd_flops(m, n) + product, calls + 1
            continue
        if method == "iso_cts":
            per += (1 + tasks) * svd_flops(m, n) + tasks * 4.0 * m * n * r + polars + product
            calls += 3 + tasks
            continue
        per, calls = per + polars + product, calls + 2
        size = task_svd_bytes(m, n)
        for _ in range(tasks):
            wanted += size
            if cached + size <= SVD_CACHE_BYTES:
                cached, once, calls_once = cached + size, once + svd_flops(m, n), calls_once + 1
            else:
                per, calls = per + svd_flops(m, n), calls + 1
    return SubspaceWork(per, once, cached, wanted, calls, calls_once)


def subspace_s(model: ModelFacts, speed: Speed, method: str) -> tuple[float, float]:
    """(seconds of every merge, seconds once per worker) of `method`'s SVDs and products at `speed.svd_flops`, with
    each SVD's fixed cost and, for TSV-M, its cache keys' digests of the inputs' matrices; the fixed costs scale
    as the SVD rate does (one thread: the rate over the fitting machine's)."""
    work = subspace_work(model, method)
    if not work.per_merge and not work.once:
        return 0.0, 0.0
    reference = PROBE_REF / (1 + THREAD_SCALING) * SVD_EFFICIENCY
    rate = speed.svd_flops or reference
    slower = reference / rate
    fixed = work.calls * SVD_CALL_S
    if method == "tsv_m":
        fixed += model.n_inputs * sum(m * n for m, n in model.weight_matrices) * model.itemsize / DIGEST_BYTES_S
    return work.per_merge / rate + fixed * slower, work.once / rate + work.calls_once * SVD_CALL_S * slower


def refinement_s(
    model: ModelFacts, tasks: TaskFacts, speed: Speed, rounds: int, steps: int, method: str = "task_arithmetic"
) -> float:
    """Seconds of all the budget's refinement rounds: per step a forward and backward pass over the refinement batch but
    the tokens its tasks' shared prefixes skip (3 forwards' FLOPs), the surrogate's weights written (a merge) and
    each tensor's fixed cost; per round, TSV-M's surrogate is built from the SVDs (refine/differentiable.py
    `freeze_tsv_m`: a merge's SVD work)."""
    tokens = tasks.refine_tokens - tasks.refine_shared  # a shared prefix (a chat turn) runs once (scoring/prefix.py)
    compute = 3 * tokens * forward_flops(model) / (speed.refine_flops or speed.flops)
    step = compute + merge_s(model, speed) + model.tensors * REFINE_TENSOR_S * speed.host_scale
    build = subspace_s(model, speed, method)[0] if method == "tsv_m" else 0.0
    return rounds * (steps * step + build)


def trial_time(
    model: ModelFacts,
    tasks: TaskFacts,
    speed: Speed,
    n_trials: int,
    rounds: int,
    steps: int,
    method: str = "task_arithmetic",
    portfolio: Sequence[str] = (),
) -> TrialTime:
    """A trial's seconds by part for a search by `method`, and each of the `portfolio` methods' default merges
    (a merge by that method, an evaluation, the overhead; TSV-M's per-task SVDs in full: its cache starts empty)."""
    per, once = subspace_s(model, speed, method)
    evaluation = evaluation_s(model, tasks, speed)
    overhead = TRIAL_OVERHEAD_S * speed.host_scale
    work = subspace_work(model, method)
    return TrialTime(
        merge=merge_s(model, speed, method),
        evaluation=evaluation,
        refinement=refinement_s(model, tasks, speed, rounds, steps, method) / max(1, n_trials),
        overhead=overhead,
        speed=speed,
        method=method,
        subspace=per,
        setup=once,
        svd_cache=(work.cached, work.wanted),
        portfolio=tuple(
            (name, merge_s(model, speed, name) + subspace_s(model, speed, name)[1] + evaluation + overhead)
            for name in portfolio
        ),
    )


__all__ = [
    "GPUS",
    "SUBSPACE_METHODS",
    "Speed",
    "SubspaceWork",
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
    "subspace_s",
    "subspace_work",
    "svd_flops",
    "task_svd_bytes",
    "trial_time",
]
