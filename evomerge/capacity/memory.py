"""How much memory one worker needs, term by term, from `ModelFacts` and `TaskFacts`.

Per worker, on its device (the GPUs of its group, or host memory for a CPU worker):
  resident    params x itemsize: the one model every candidate is merged into
  evaluation  one lm-eval batch: B x T x (V x (itemsize + 4)) for the logits and lm-eval's float32 log-softmax,
              plus one decoder layer's activations B x T x (4 h + 3 i) x itemsize and the KV cache
              2 x layers x B x T x kv_heads x head_dim x itemsize (T: the longest request, generation included)
  merge       one tensor's buffers: the inputs copied to the device and the kernel's work tensors,
              (inputs + 2) x largest tensor x 4
  refinement  `refine_bytes`: refine/footprint.py's formula (only while a refinement round runs); per-row TIES
              rounds (refine.arms rows, distill) add `row_ties_bytes` in host memory: one tensor's TIES
              over row-scaled task vectors in float32, (6 x models + 6) x largest tensor x 4
  tsv_m       (host memory, the worker's device or not) `svd_cache_bytes`: TSV-M's per-task SVDs a worker keeps,
              float32 U, S, V^T of every weight matrix and model, at most SVD_CACHE_BYTES: in each worker when the
              method is tsv_m; once per node when the portfolio scores TSV-M's default merge (one worker holds it
              for that merge: the next merge by another method empties it); during a refinement round
              `tsv_m_surrogate_bytes`:
              the surrogate's merged parts, a float32 copy of each weight matrix per model, and the base's matrices
              in float32 where it is stored narrower (refine/differentiable.py `freeze_tsv_m`)
Evaluation, merge and refinement never run at once in a worker, so its peak is resident + runtime + the largest
of the three. Per node, the memory-mapped inputs' pages (the page cache, counted once for all the node's workers;
each worker's RSS shows the pages it touched) and Ray's own processes come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from evomerge.capacity.facts import ModelFacts, TaskFacts

GB = 1e9
# A worker process before its model: Python, torch, transformers, lm-eval, Ray's worker, the built tasks
# (measured with bench/scale.py on CPU, torch 2.13.0+cpu; a CUDA build maps its libraries too: CUDA_HOST).
RUNTIME_HOST = int(0.75 * GB)
CUDA_HOST = int(1.5 * GB)  # host RSS a CUDA build of torch adds (its libraries); checked by bench/gpu_check.py
CUDA_CONTEXT = int(0.6 * GB)  # device memory of a CUDA context and the caching allocator's slack per GPU
RAY_NODE = int(0.6 * GB)  # Ray's processes on a node (GCS, raylet, agents): measured on CPU, load-dependent
DEVICE_SHARE = 0.92  # of a GPU's free memory the plan fills (fragmentation, other processes' growth)
CPU_BATCH = 64  # lm-eval's batch on CPU (the batch before the plan; larger gains nothing on 2-16 cores)
MAX_BATCH = 512
AUTO_START = 64  # lm-eval's batch_size "auto" starts there (HFLM's max_batch_size) and halves on out-of-memory


@dataclass(frozen=True)
class Settings:
    """The config settings the plan depends on (SearchConfig's, or a projection's)."""

    count: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    refine: bool = True
    method: str = "task_arithmetic"
    row_ties: bool = False  # per-row rounds of a TIES search run (refine.arms rows or distill)
    batch_size: int | str | None = None  # workers.batch_size: None (the plan's), an int, or "auto" (lm-eval's)
    portfolio: tuple[str, ...] = ()  # the methods whose default merges the portfolio scores


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's needs in bytes: on its device(s) (`per_device`: each GPU of its group, empty on CPU) and in
    host memory (`host`: its own bytes; the inputs' pages come on top, once per node)."""

    resident: int
    evaluation: int
    merge: int
    refinement: int
    batch_size: int | str
    per_device: tuple[int, ...]
    host: int  # the worker process's peak RSS less the inputs' pages
    svd_cache: int = 0  # of `host`: TSV-M's per-task SVDs (kept from trial to trial)
    portfolio_cache: int = 0  # not in `host`: the SVD cache of the portfolio's TSV-M merge (one worker, once a node)
    surrogate: int = 0  # of `host` (of `refinement` on CPU): TSV-M's surrogate during a refinement round

    @property
    def transient(self) -> int:
        return max(self.evaluation, self.merge, self.refinement)


def eval_bytes(model: ModelFacts, tasks: TaskFacts, batch: int) -> int:
    """One lm-eval batch of the longest requests (its rows are padded to the longest)."""
    t, s = tasks.longest, model.itemsize
    logits = batch * t * model.vocab * (s + 4)
    layer = batch * t * (4 * model.hidden + 3 * model.intermediate) * s
    kv = 2 * model.layers * batch * t * model.kv_heads * model.head_dim * s
    return logits + layer + kv


def merge_bytes(model: ModelFacts) -> int:
    return (model.n_inputs + 2) * model.largest * 4


def refine_bytes(model: ModelFacts, tasks: TaskFacts, method: str, on_gpu: bool = False, threads: int = 1) -> int:
    """Extra memory of a refinement round: refine/footprint.py's formula (refine/tensor.py's docstring) for the
    micro-batch the Refiner takes (its default size, or all the training rows when they are fewer), on the
    resident model's device; DELLA's bit-packed masks (host memory) are added too."""
    from evomerge.refine.footprint import default_micro_batch_tokens, refine_extra_bytes

    s = model.itemsize
    tokens = min(default_micro_batch_tokens(model.config, model.resident_bytes, s), max(tasks.refine_tokens, 1))
    extra = refine_extra_bytes(
        model.config,
        model.resident_bytes,
        model.n_inputs - 1,
        largest=model.largest * s,
        dtype_bytes=s,
        tokens=tokens,
        threads=threads,
        accelerator=on_gpu,
        della=method.startswith("della"),
    )
    return extra["device"] + extra["host"]


def row_ties_bytes(model: ModelFacts) -> int:
    """Host memory a per-row TIES step holds for its largest tensor (refine/rows.py `_ties`), in float32: the
    base, and per model its task vector, its scaled and pruned copy, its agreement mask, its derivative factor
    and the products' transients (bench/refine_memory.py --rows --method ties measures it)."""
    return (6 * (model.n_inputs - 1) + 6) * model.largest * 4


def svd_cache_bytes(model: ModelFacts) -> int:
    """TSV-M's SVD cache once full: the float32 U, S, V^T of every weight matrix's task vectors, as far as
    SVD_CACHE_BYTES holds them (merge/kernels/subspace.py; filled in merge order, never evicted)."""
    from evomerge.capacity.timing import subspace_work

    return subspace_work(model, "tsv_m").cached


def tsv_m_surrogate_bytes(model: ModelFacts) -> int:
    """TSV-M's surrogate in a refinement round (refine/differentiable.py `freeze_tsv_m`): per weight matrix, base + A_i
    in float32 for each model i (held while the start point lasts), and the base's matrix in float32 where the inputs
    store it narrower. The other tensors' surrogate reads the memory-mapped inputs (no copy)."""
    copies = (model.n_inputs - 1) + (model.stored_itemsize != 4)
    return sum(copies * m * n * 4 for m, n in model.weight_matrices)


def batch_for(model: ModelFacts, tasks: TaskFacts, budget: int) -> int:
    """The largest evaluation batch whose activations fit `budget` bytes (at most the number of requests, and
    MAX_BATCH); 0 when not even one request fits."""
    one = eval_bytes(model, tasks, 1)
    if one > budget:
        return 0
    return max(1, min(MAX_BATCH, max(tasks.requests, 1), budget // max(one, 1)))


def worker_memory(model: ModelFacts, tasks: TaskFacts, settings: Settings, device_free: int | None) -> WorkerMemory:
    """One worker's memory. `device_free`: free bytes of each of its GPUs (sizes the evaluation batch; None on
    CPU or when unknown: a CPU worker evaluates with CPU_BATCH, a GPU one with what is left of the budget)."""
    n = max(1, int(settings.num_gpus)) if settings.num_gpus > 0 else 0
    resident = model.resident_bytes
    threads = max(1, int(settings.num_cpus))
    refine = refine_bytes(model, tasks, settings.method, on_gpu=n > 0, threads=threads) if settings.refine else 0
    row_host = row_ties_bytes(model) if settings.refine and settings.row_ties else 0
    row_host += (surrogate := tsv_m_surrogate_bytes(model) if settings.refine and settings.method == "tsv_m" else 0)
    cache = svd_cache_bytes(model) if settings.method == "tsv_m" else 0
    lent = svd_cache_bytes(model) if settings.method != "tsv_m" and "tsv_m" in settings.portfolio else 0
    if n == 0:
        refine += row_host  # all of it in host memory
    merge = merge_bytes(model)
    batch: int | str
    if isinstance(settings.batch_size, int):
        batch = settings.batch_size
    elif settings.batch_size == "auto":
        batch = "auto"  # lm-eval's own search, from AUTO_START down
    elif n == 0:
        batch = min(CPU_BATCH, max(tasks.requests, 1))
    else:
        free = device_free if device_free is not None else int(80e9)
        left = n * int(free * DEVICE_SHARE) - resident - n * CUDA_CONTEXT - max(refine, merge)
        batch = batch_for(model, tasks, left // n if n > 1 else left) or 1
    evaluation = eval_bytes(model, tasks, batch if isinstance(batch, int) else min(AUTO_START, tasks.requests))
    transient = max(evaluation, merge, refine)
    if n == 0:  # all of it in host memory
        host = RUNTIME_HOST + resident + transient + cache
        return WorkerMemory(resident, evaluation, merge, refine, batch, (), host, cache, lent, surrogate)
    per_device = _per_device(model, n, resident, transient)
    host = RUNTIME_HOST + CUDA_HOST + row_host + cache
    return WorkerMemory(resident, evaluation, merge, refine, batch, per_device, host, cache, lent, surrogate)


def device_batch(materializer, scorer, refine_method: str | None = None) -> int:
    """The evaluation batch of a resident model where it lives: CPU_BATCH on CPU; on GPUs the largest whose
    activations fit the fullest GPU of its group now (the model allocated), less one merge's buffers or, with
    `refine_method`, a refinement round's extra (per GPU), whichever is larger."""
    import torch

    devices = [torch.device(d) for d in materializer.devices]
    if all(d.type == "cpu" for d in devices):
        return CPU_BATCH
    base = materializer.base_model or materializer.inputs[-1]
    dtype = str(next(materializer.model.parameters()).dtype).removeprefix("torch.")
    model = ModelFacts.of_inputs(base, [m for m in materializer.inputs if m != base], dtype=dtype)
    tasks = TaskFacts.of_scorer(scorer, base)
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    reserve = refine_bytes(model, tasks, refine_method, on_gpu=True) // len(devices) if refine_method else 0
    budget = int(free * DEVICE_SHARE) - max(merge_bytes(model), reserve)
    return batch_for(model, tasks, budget) or 1


def _per_device(model: ModelFacts, n: int, resident: int, transient: int) -> tuple[int, ...]:
    """Each GPU of a group: its share of the resident model (whole decoder layers; the embeddings on the first,
    the head on the last, as accelerate's balanced map puts them), the transient peak split the same way, the
    logits where the head is, and a CUDA context."""
    if n == 1:
        return (resident + transient + CUDA_CONTEXT,)
    s = model.itemsize
    layers_each = math.ceil(model.layers / n)
    ends = (model.params - model.layers * model.layer_params) * s // 2  # embeddings, and the head (or tied)
    shard = layers_each * model.layer_params * s + ends
    return tuple(shard + transient // n + CUDA_CONTEXT for _ in range(n))


__all__ = [
    "CUDA_CONTEXT",
    "RAY_NODE",
    "RUNTIME_HOST",
    "Settings",
    "WorkerMemory",
    "batch_for",
    "device_batch",
    "eval_bytes",
    "merge_bytes",
    "refine_bytes",
    "row_ties_bytes",
    "svd_cache_bytes",
    "tsv_m_surrogate_bytes",
    "worker_memory",
]
