"""The per-tensor refinement's differentiable merge (a "surrogate" of the real merge, not a Bayesian-optimisation
surrogate model), one tensor at a time in chunks: the merged state at given weights written into the resident
model, and the gradient of the loss with respect to those weights from the merged parameter's own gradient
(refine/tensor.py drives both). The TIES sign election is the kernels' own (merge/kernels/gta.py).

    ft = freeze(name, base, [m1, m2], method, params, seed=0)   # flat memory-mapped tensors; masks frozen
    write_merged(ft, [w1, w2], lam, out=resident_tensor)          # theta at these weights, in place
    dw1, dw2, dlam = merged_grads(ft, [w1, w2], lam, grad=resident_tensor_grad)

Per tensor, with s_i = mask_i * (model_i - base) * rescale_i model i's task vector sparsified at the start
point (TIES/breadcrumbs magnitude masks, DARE/DELLA random ones, DARE/DELLA's L1 rescale: evomerge-1's rules,
so the masks are the ones a trial with the same densities and seed is merged with), w_i its weight and lam
lambda:

    consensus (TIES' sign election, recomputed at every point, without gradient):
        e = +1 where sum_j w_j s_j >= 0, else -1;   c_i = [sign(s_i) * sgn(w_i) == e]   (sgn(0) = +1)
    without consensus c_i = 1.
    M = sum_i w_i c_i s_i
    D = sum_i w_i c_i (elementwise with consensus; one scalar, sum_i w_i, without); where D == 0 (consensus)
        or |D| < 1e-8 (without), D := 1 and nz := 0, else nz := 1; without normalisation D := 1, nz := 0
    mixed = M / D,    theta = base + lam * mixed
    d theta / d lam = mixed,    d theta / d w_i = lam * c_i * (s_i - nz * mixed) / D

(sgn(w_i) makes c_i mergekit's [sign(w_i s_i) == e] for w_i != 0 and gives the derivative from above at
w_i = 0, where mergekit's mask would freeze a zero weight.) So dL/dw_i = <G, d theta / d w_i> and
dL/dlam = <G, mixed>, with G = dL/d theta the resident parameter's gradient: per chunk, the task vectors are
read from the memory-mapped inputs, masked, combined and dotted with G's chunk, so no task vector is ever held
whole on any device.

Memory, per tensor and model: TIES/breadcrumbs keep a threshold and a cut index (two numbers); DARE keeps its
counter-stream key and rescale factor and redraws its mask chunk by chunk (regeneration is a few integer ops
per element); DELLA's mask (ranked keep probabilities along each row: a sort per row to redraw) is kept
bit-packed in host memory, numel / 8 bytes. Chunk buffers per worker thread: 2k + 6 chunks in float32 and 2 in
the merge's dtype (k models), plus the inputs' and the gradient's chunks copied to an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from evomerge.merge.kernels.gta import Pruner

CPU_CHUNK = 1 << 16  # elements: a chunk's buffers stay in a core's L2 cache (as evomerge-1's kernels)
DEVICE_CHUNK = 1 << 22  # on an accelerator: about (2k + 8) x 16 MiB of buffers


@dataclass
class FrozenTensor:
    """One tensor's surrogate at a start point: its flat inputs (memory-mapped, never copied whole), the
    pruner of each task vector and the method's flags."""

    name: str
    base: torch.Tensor
    models: list[torch.Tensor]
    dtype: torch.dtype  # the merge's work dtype: task vectors are formed (and magnitude-pruned) in it
    pruners: list[Pruner]
    packed: list[torch.Tensor | None]  # DELLA: the keep mask, 8 elements a byte (host memory)
    consensus: bool
    normalize: bool

    @property
    def numel(self) -> int:
        return self.base.numel()


def freeze(
    name: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    method: Any,
    params: list[dict[str, Any]],
    *,
    seed: int,
    positions: list[int],
    shared: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> FrozenTensor:
    """The surrogate of tensor `name`: `params[i]` model i's resolved values (density, gamma, epsilon),
    `positions[i]` its index among the recipe's inputs (it keys DARE/DELLA's random streams), `shared` the
    shared ones (rescale, normalize). Pruners are built on the inputs' own (host) device, one tensor at a time."""
    from evomerge.merge.kernels.counter import stream_key
    from evomerge.merge.kernels.gta import CPU_CHUNK as MERGE_CHUNK
    from evomerge.merge.kernels.gta import frozen_pruner

    if method.spec.name == "tsv_m":
        return freeze_tsv_m(name, base, models, params, positions=positions)
    if method.consensus_method not in (None, "sum"):
        raise ValueError(f"{method.spec.name}: consensus {method.consensus_method!r} has no surrogate")
    dtype = dtype or base.dtype
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    work_base = flat_base.to(dtype)  # a copy only where the merge's dtype is not the stored one
    pruners, packed = [], []
    for flat, p, position in zip(flats, params, positions):
        extra = {k: p[k] for k in ("gamma", "epsilon") if k in p}
        pruner = frozen_pruner(
            method,
            work_base,
            flat.to(dtype),
            float(p.get("density", 1.0)),
            bool(shared.get("rescale")),
            extra,
            stream_key(seed, name, position),
            MERGE_CHUNK,
        )
        bits = None
        if pruner.stored is not None:  # DELLA's mask: 1 byte per element -> 1 bit
            bits, pruner.stored = _pack(pruner.stored), None
        pruners.append(pruner)
        packed.append(bits)
    return FrozenTensor(
        name,
        flat_base,
        flats,
        dtype,
        pruners,
        packed,
        consensus=method.consensus_method is not None,
        normalize=bool(shared.get("normalize", False)),
    )


def freeze_tsv_m(
    name: str, base: torch.Tensor, models: list[torch.Tensor], params: list[dict[str, Any]], *, positions: list[int]
) -> FrozenTensor:
    """TSV-M's surrogate of tensor `name` at the start point's rank fractions (`params[i]["rank_fraction"]`): exact,
    because at fixed ranks TSV-M is task arithmetic on fixed parts, theta = base + lambda * sum_i w_i A_i
    (merge/kernels/subspace.py's `tsv_m_parts`), so the task-arithmetic surrogate above runs on "models"
    base + A_i (float32, held in host memory: one copy of each merged matrix per model while the start point
    lasts). Tensors outside the SVD (norms, biases, embeddings, head) are the weighted mean of the task vectors:
    the surrogate above with `normalize`."""
    import torch

    from evomerge.merge.kernels.subspace import takes_subspace_rule, task_svds, tsv_m_parts
    from evomerge.merge.methods import get_method

    arithmetic = get_method("task_arithmetic")
    if not takes_subspace_rule(name, base):
        return freeze(
            name, base, models, arithmetic, [{}] * len(models), seed=0, positions=positions, shared={"normalize": True}
        )
    base32 = base.detach().to("cpu", torch.float32)
    taus = [m.detach().to("cpu", torch.float32) - base32 for m in models]
    svds = task_svds(name, base, models, taus)
    parts = tsv_m_parts(taus, [float(p.get("rank_fraction", 1.0)) for p in params], svds)
    effective = [base32 + part for part in parts]
    return freeze(
        name,
        base32,
        effective,
        arithmetic,
        [{}] * len(models),
        seed=0,
        positions=positions,
        shared={},
        dtype=torch.float32,
    )


def write_merged(ft: FrozenTensor, weights: list[float], lam: float, out: torch.Tensor) -> None:
    """out (the resident model's tensor, any device and dtype) = the surrogate's merge at these weights."""
    import torch

    flat = out.view(-1)

    def body(bufs: _Buffers, start: int, end: int) -> None:
        b, _, _, _, mixed = _terms(ft, weights, bufs, start, end)
        theta = torch.add(b, mixed, alpha=lam, out=bufs.t[: end - start])
        flat[start:end].copy_(theta)

    _map(ft, out.device, body)


def merged_grads(ft: FrozenTensor, weights: list[float], lam: float, grad: torch.Tensor) -> list[float]:
    """[dL/dw_1, ..., dL/dw_k, dL/dlam] from `grad` = dL/d theta (the resident parameter's gradient)."""
    import torch

    flat = grad.view(-1)
    k = len(weights)

    def body(bufs: _Buffers, start: int, end: int) -> torch.Tensor:
        n = end - start
        _, s, c, d, mixed = _terms(ft, weights, bufs, start, end)
        g = bufs.g[:n]
        g.copy_(flat[start:end])
        out = torch.empty(k + 1, dtype=torch.float64, device=g.device)  # on the device: no sync per chunk
        out[k] = torch.dot(g, mixed)
        masked = None  # nz * mixed: no derivative through D where it was replaced by 1
        if ft.normalize:
            div, nz = d
            g.div_(div)
            if torch.is_tensor(nz):
                masked = torch.mul(mixed, nz, out=bufs.mask[:n])  # the task vectors are built: `mask` is free
            elif nz:
                masked = mixed
        for i in range(k):
            gi = torch.mul(g, c[i], out=bufs.t[:n]) if c is not None else g
            out[i] = torch.dot(gi, s[i])
            if masked is not None:
                out[i] -= torch.dot(gi, masked)
        out[:k] *= lam
        return out

    return torch.stack(_map(ft, grad.device, body)).sum(0).tolist()


# -- chunk by chunk --------------------------------------------------------------------------------------------
class _Buffers:
    """One worker thread's chunk buffers (float32 but `raw`/`mag`, in the merge's dtype)."""

    def __init__(self, size: int, k: int, dtype: torch.dtype, device: Any, consensus: bool):
        import torch

        from evomerge.merge.kernels.gta import Scratch

        f = lambda dt=torch.float32: torch.empty(size, dtype=dt, device=device)  # noqa: E731
        self.device = device
        self.raw, self.mag = f(dtype), f(dtype)
        self.mask, self.spare, self.m, self.t, self.g = f(), f(), f(), f(), f()
        self.d = f() if consensus else None
        self.s = [f() for _ in range(k)]
        self.c = [f() for _ in range(k)] if consensus else None
        self.scratch = Scratch(size, device)


def _map(ft: FrozenTensor, device: Any, body) -> list:
    import torch

    from evomerge.merge.kernels.chunks import map_chunks

    size = CPU_CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK
    n = ft.numel

    def state() -> _Buffers:
        return _Buffers(min(n, size), len(ft.models), ft.dtype, device, ft.consensus)

    return map_chunks(n, size, body, state, device)


def _terms(ft: FrozenTensor, w: list[float], bufs: _Buffers, start: int, end: int):
    """(base chunk, [s_i], [c_i] or None, (D, nz) or None, mixed) of one chunk (see the module docstring)."""
    import torch

    from evomerge.merge.kernels.gta import agreement, elected_sign

    n = end - start
    b = ft.base[start:end].to(device=bufs.device, dtype=ft.dtype)
    s = [x[:n] for x in bufs.s]
    for i in range(len(ft.models)):
        _task_vector_into(ft, i, b, start, end, bufs, s[i])
    mixed = bufs.m[:n]
    d: tuple[Any, Any] | None = None
    if not ft.consensus or bufs.c is None or bufs.d is None:
        torch.mul(s[0], w[0], out=mixed)
        for si, wi in zip(s[1:], w[1:]):
            mixed.add_(si, alpha=wi)
        if ft.normalize:
            total = sum(w)
            d = (1.0, 0.0) if abs(total) < 1e-8 else (total, 1.0)
            mixed.div_(d[0])
        return b, s, None, d, mixed
    c = [x[:n] for x in bufs.c]
    torch.mul(s[0], w[0], out=mixed)  # the weighted sum whose sign is elected
    for si, wi in zip(s[1:], w[1:]):
        mixed.add_(si, alpha=wi)
    elected = elected_sign(mixed, out=bufs.t[:n])
    for si, ci, wi in zip(s, c, w):
        agreement(si, elected, out=ci, negate=wi < 0)
    mixed.zero_()
    for si, ci, wi in zip(s, c, w):
        mixed.addcmul_(ci, si, value=wi)
    if ft.normalize:
        div = bufs.d[:n].zero_()
        for ci, wi in zip(c, w):
            div.add_(ci, alpha=wi)
        zero = torch.eq(div, 0, out=bufs.spare[:n])  # the task vectors are built: `spare` is free
        div.add_(zero)  # 1 where the divisor is 0 (mergekit's rule), exact elsewhere
        mixed.div_(div)
        d = (div, zero.neg_().add_(1))
    return b, s, c, d, mixed


def _task_vector_into(ft: FrozenTensor, i: int, b: torch.Tensor, start: int, end: int, bufs: _Buffers, out):
    """out (float32) = model i's frozen sparsified task vector over elements start..end-1."""
    import torch

    from evomerge.merge.kernels.gta import mask_into

    n = end - start
    p, packed = ft.pruners[i], ft.packed[i]
    raw = torch.sub(ft.models[i][start:end].to(device=bufs.device, dtype=ft.dtype), b, out=bufs.raw[:n])
    out.copy_(raw)
    if packed is not None:
        out.mul_(_unpack(packed, start, n, bufs.mask[:n]))
    elif p.prunes:
        magnitudes = torch.abs(raw, out=bufs.mag[:n]) if p.top is not None else raw
        out.mul_(mask_into(p, magnitudes, start, bufs.mask[:n], bufs.scratch, spare=bufs.spare[:n]))
    if p.factor is not None:
        out.mul_(p.factor)
    return out


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """0/1 bytes (flat) -> bits, 8 elements a byte (element j: bit j % 8 of byte j // 8), on the host."""
    import torch

    n = mask.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    step = 1 << 20  # elements packed at once
    for lo in range(0, n, step):
        part = mask[lo : lo + step].to("cpu")
        pad = (-part.numel()) % 8
        if pad:
            part = torch.cat([part, part.new_zeros(pad)])
        out[lo // 8 : lo // 8 + part.numel() // 8] = (part.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)
    return out


def _unpack(packed: torch.Tensor, start: int, n: int, out: torch.Tensor) -> torch.Tensor:
    """out (float) = the 0/1 mask of elements start..start+n-1 (`start` a multiple of 8)."""
    import torch

    part = packed[start // 8 : (start + n + 7) // 8].to(out.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=out.device)
    bits = (part.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n]
    return out.copy_(bits)


__all__ = ["CPU_CHUNK", "DEVICE_CHUNK", "FrozenTensor", "freeze", "freeze_tsv_m", "merged_grads", "write_merged"]
