"""evomerge-1's generalized task arithmetic: TIES, DARE, DELLA and breadcrumbs in two chunked passes.

    result = merge_gta(method, base, others, params, out=None, seed=0, name="model.layers.0.mlp.up_proj.weight")

Pass 1, only where a pruner needs it: each task vector's magnitude threshold (`select.top_k`), its stored
random mask (DELLA, or DARE with `rescale`) and its L1 rescale factor (`l1.py`). Pass 2, chunk by chunk:
delta = model - base, masked (and rescaled), weighted, TIES sign election, the (normalized, lambda-scaled)
sum added to base and written into `out`. The arithmetic after the mask is mergekit's
`GeneralizedTaskArithmeticMerge.merge_group`, operation for operation in the same dtypes, so given the
same masks the result has the same bits; every operation is elementwise or exact, so the chunk size,
thread count and device do not change a bit. Temporaries: a few chunk-sized buffers per worker thread, and
one byte per element per input for a stored mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.merge.kernels.chunks import map_chunks
from evomerge.merge.kernels.counter import keep_threshold, random_bits_into, stream_key
from evomerge.merge.kernels.l1 import BLOCK, block_sums, rescale_factor, totals
from evomerge.merge.kernels.select import TopK, top_k

if TYPE_CHECKING:
    import torch

CPU_CHUNK = 1 << 16  # elements per chunk: its buffers stay in a core's L2 cache
GPU_CHUNK = 1 << 24


@dataclass
class Pruner:
    """How one task vector is sparsified: a selection, a band, a random threshold or a stored mask."""

    top: TopK | None = None  # keep the first `top` (magnitude pruning)
    drop: TopK | None = None  # ... except the first `drop` (breadcrumbs' outliers)
    key: tuple[int, int] | None = None  # random: this stream's bits below `bound` are kept
    bound: int = 0
    stored: torch.Tensor | None = None  # uint8 0/1 per element, made in pass 1 (DELLA; DARE with rescale)
    factor: float | None = None  # L1 rescale, applied after the mask
    work: torch.dtype | None = None  # dtype of mask and rescale (mergekit's DARE/DELLA use float32 for fp16)

    @property
    def prunes(self) -> bool:
        return self.top is not None or self.key is not None or self.stored is not None


def merge_gta(
    method: Any,
    base: torch.Tensor,
    others: Sequence[tuple[str, int, torch.Tensor]],
    params: Mapping[str, Any],
    out: torch.Tensor | None = None,
    *,
    seed: int = 0,
    name: str = "",
    chunk: int | None = None,
) -> torch.Tensor:
    """One merged tensor. `others`: (input id, position among the recipe's inputs, tensor) of each non-base
    input; `params`: mergekit's binding (per-input values keyed by input id). The random streams are keyed
    by (seed, name, position)."""
    import torch

    dtype, n = base.dtype, base.numel()
    chunk = chunk or (GPU_CHUNK if base.device.type == "cuda" else CPU_CHUNK)
    if chunk % BLOCK:
        raise ValueError(f"chunk {chunk} is not a multiple of the L1 block {BLOCK}")
    flat_base = base.reshape(-1)
    flats = [t.to(dtype).reshape(-1) for _, _, t in others]
    pruners = []
    for (key, position, _), flat in zip(others, flats):
        extra = {k: params[k][key] for k in ("gamma", "epsilon") if k in params}
        pruners.append(
            _pruner(
                method.sparsification_method,
                flat_base,
                flat,
                params["density"][key],
                bool(params["rescale"]),
                extra,
                stream_key(seed, name, position),
                chunk,
            )
        )
    weights = torch.tensor([params["weight"][key] for key, _, _ in others], dtype=dtype).tolist()  # mergekit's rounding
    direct = (
        out is not None
        and out.dtype == dtype
        and out.shape == base.shape
        and out.is_contiguous()
        and out.device == base.device
    )
    result = out.view(-1) if direct else torch.empty(n, dtype=dtype, device=base.device)
    _combine(method, params, flat_base, flats, pruners, weights, result, chunk)
    return out if direct else result.view(base.shape)


def _pruner(kind, base, model, density, rescale, extra, key, chunk) -> Pruner:
    import torch
    from mergekit.sparsify import SparsificationMethod as S

    from evomerge.merge.kernels.della import della_mask

    dtype, n = base.dtype, base.numel()
    if kind is None or density >= 1:
        return Pruner()

    def magnitudes(start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return torch.sub(model[start:end], base[start:end], out=out[: end - start]).abs_()

    def sample(stride: int) -> torch.Tensor:
        return (model[::stride] - base[::stride]).abs_()

    work = torch.float32 if dtype == torch.float16 and kind in (S.random, S.della_magprune) else dtype
    if kind == S.magnitude:
        p = Pruner(top=top_k(n, max(1, int(density * n)), magnitudes, sample, chunk, base), work=work)
    elif kind == S.magnitude_outliers:
        keep = int(density * n)
        bottom = max(0, n - keep - int(extra.get("gamma", 0.01) * n))
        top = n - keep - bottom  # the largest `top` are outliers, dropped
        p = Pruner(
            top=top_k(n, top + keep, magnitudes, sample, chunk, base),
            drop=top_k(n, top, magnitudes, sample, chunk, base),
            work=work,
        )
    elif kind == S.random:
        keep_p = torch.tensor(density, dtype=work).item()  # mergekit draws with the density in its work dtype
        if keep_p >= 1:
            return Pruner()
        p = Pruner(key=key, bound=keep_threshold(keep_p), work=work)
        if rescale:
            p.stored = torch.empty(n, dtype=torch.uint8, device=base.device)
    elif kind == S.della_magprune:
        p = Pruner(stored=della_mask(base, model, density, extra.get("epsilon", 0.15), key, work), work=work)
    else:
        raise NotImplementedError(kind)
    if rescale or (p.key is not None and p.stored is not None):
        p.factor = _first_pass(p, base, model, chunk, rescale)
    return p


def _first_pass(p: Pruner, base: torch.Tensor, model: torch.Tensor, chunk: int, rescale: bool) -> float | None:
    """Draw and store the random mask (DARE with rescale) and/or compute the L1 rescale factor."""
    import torch

    n, size = base.numel(), min(base.numel(), chunk)

    def state():
        return (
            torch.empty(size, dtype=p.work, device=base.device),
            torch.empty(size, dtype=p.work, device=base.device),
            Scratch(size, base.device),
            (torch.empty(size, device=base.device), torch.empty(size, dtype=torch.int32, device=base.device)),
        )

    def body(bufs, start: int, end: int):
        a, m, scratch, sums = bufs
        x, mask = a[: end - start], m[: end - start]
        if p.work == base.dtype:
            torch.sub(model[start:end], base[start:end], out=x)
        else:
            x.copy_(model[start:end] - base[start:end])
        x.abs_()
        _mask_into(p, x, start, mask, scratch, fresh=True)
        if p.key is not None and p.stored is not None:
            p.stored[start:end].copy_(mask)
        return block_sums(x, mask, sums) if rescale else None

    parts = map_chunks(n, chunk, body, state, base.device)
    return rescale_factor(*totals(parts), p.work) if rescale else None


class Scratch:
    """Chunk-sized integer buffers for the random bits."""

    def __init__(self, size: int, device: Any):
        import torch

        self.bits = torch.empty(size, dtype=torch.int32, device=device)
        self.tmp = torch.empty_like(self.bits)
        self.index = torch.arange(size, dtype=torch.int32, device=device)


def _mask_into(
    p: Pruner,
    a: torch.Tensor,
    start: int,
    out: torch.Tensor,
    scratch: Scratch,
    spare: torch.Tensor | None = None,
    fresh: bool = False,
) -> torch.Tensor:
    """out = p's keep mask (0/1 in out's dtype) for the chunk at `start`; `a` holds its magnitudes (read
    only by magnitude pruning), `spare` a float buffer like `out` (breadcrumbs), `fresh`: draw, don't load."""
    import torch

    n = out.numel()
    if p.key is not None and (fresh or p.stored is None):
        bits = random_bits_into(p.key, start, scratch.bits[:n], scratch.tmp, scratch.index)
        return torch.lt(bits, p.bound, out=out)
    if p.stored is not None:
        return out.copy_(p.stored[start : start + n])
    p.top.mask_into(a, start, out)
    if p.drop is not None:
        out.sub_(p.drop.mask_into(a, start, spare if spare is not None else torch.empty_like(out)))
    return out


def _combine(method, params, base, flats, pruners, weights, result, chunk) -> None:
    """Pass 2: mergekit's merge_group arithmetic chunk by chunk, into `result` (flat)."""
    import torch

    n, k, dtype = base.numel(), len(flats), base.dtype
    size = min(n, chunk)
    consensus = method.consensus_method is not None
    if not consensus:  # mergekit: divisor = weights.sum(0), near zero -> 1; a device tensor (true division)
        total = torch.tensor(weights, dtype=dtype, device=base.device).sum(0)
        divisor = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    wide = {p.work for p in pruners if p.prunes and p.work != dtype}

    def state():
        buf = lambda dt=dtype: torch.empty(size, dtype=dt, device=base.device)  # noqa: E731
        return (
            [buf() for _ in range(k)],
            [buf() for _ in range(k)],
            buf(),
            buf(),
            Scratch(size, base.device),
            {dt: (buf(dt), buf(dt)) for dt in wide},
        )

    def body(bufs, start: int, end: int) -> None:
        deltas, masks, s, t, scratch, wide_bufs = bufs
        L = end - start
        b = base[start:end]
        ds, ms, mixed, spare = [d[:L] for d in deltas], [m[:L] for m in masks], s[:L], t[:L]
        for d, m, flat, p, w in zip(ds, ms, flats, pruners, weights):
            torch.sub(flat[start:end], b, out=d)
            if p.prunes:
                _pruned_delta(p, d, m, start, dtype, scratch, spare, mixed, wide_bufs)
            d.mul_(w)
        if consensus:
            _elect(ds, ms, weights, mixed, spare)
            div = spare
        else:
            _sum_into(ds, mixed)
            div = divisor
        if params["normalize"]:
            mixed.div_(div)
        if params["lambda"] != 1:
            mixed.mul_(params["lambda"])
        torch.add(b, mixed, out=result[start:end])

    map_chunks(n, chunk, body, state, base.device)


def _pruned_delta(p, d, m, start: int, dtype, scratch, spare, mixed, wide_bufs) -> None:
    """One model's delta chunk `d`, pruned in place by its mask (and rescaled): from the stored mask bytes, or a mask
    drawn now into `m`; DARE/DELLA on float16 mask and rescale in float32, as mergekit does on CPU."""
    import torch

    if p.work == dtype and p.stored is not None:
        d.mul_(p.stored[start : start + d.numel()])  # the 0/1 bytes multiply like 0/1 floats, without converting
        if p.factor is not None:
            d.mul_(p.factor)
    elif p.work == dtype:
        _mask_into(p, torch.abs(d, out=spare) if p.top is not None else d, start, m, scratch, spare=mixed)
        d.mul_(m)
        if p.factor is not None:
            d.mul_(p.factor)
    else:
        x, wm = (v[: d.numel()] for v in wide_bufs[p.work])
        x.copy_(d)
        _mask_into(p, x, start, wm, scratch)
        x.mul_(wm)
        if p.factor is not None:
            x.mul_(p.factor)
        d.copy_(x)


def _sum_into(xs, out) -> None:
    """out = xs[0] + xs[1] + ... in that order (torch's sum over a stacked dim 0 adds in the same order)."""
    import torch

    torch.add(xs[0], xs[1], out=out) if len(xs) > 1 else out.copy_(xs[0])
    for x in xs[2:]:
        out.add_(x)


def _elect(ds, masks, weights, mixed, divisor) -> None:
    """TIES sign election (mergekit's get_mask, "sum"): mixed = sum of the weighted deltas whose sign is
    the sign of their sum (>= 0 counts as +), divisor = sum of their weights, 0 -> 1. `masks` are scratch."""
    import torch

    _sum_into(ds, mixed)
    sign = elected_sign(mixed, out=divisor)  # `divisor` is scratch until the weights are summed into it
    for d, m in zip(ds, masks):
        agreement(d, sign, out=m)
    for d, m, w in zip(ds, masks, weights):
        d.mul_(m)
        m.mul_(w)
    _sum_into(ds, mixed)
    _sum_into(masks, divisor)
    zero = ds[0]  # the deltas are summed: scratch
    torch.eq(divisor, 0, out=zero)
    divisor.add_(zero)


def elected_sign(total: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES's sign election (mergekit's get_mask, "sum"): +1 where `total`, the weighted sum of the task vectors,
    is >= 0, else -1, in `out` (default: a new tensor like `total`). The one rule the kernels, the per-tensor
    refinement's differentiable merge (refine/differentiable.py) and the per-row refinement (refine/rows.py) share
    (a sum of -0.0 counts as +, as in mergekit)."""
    import torch

    out = torch.empty_like(total) if out is None else out
    return torch.ge(total, 0, out=out).mul_(2).sub_(1)


def agreement(delta: torch.Tensor, elected: torch.Tensor, out: torch.Tensor | None = None, *, negate: bool = False):
    """1 where sign(delta) (negated with `negate`: a task vector of negative weight) is the elected sign, else 0, in
    `out` (default: a new tensor like `delta`); a zero element never agrees."""
    import torch

    out = torch.empty_like(delta) if out is None else out
    torch.sign(delta, out=out)
    if negate:
        out.neg_()
    return torch.eq(out, elected, out=out)


def frozen_pruner(method: Any, base, model, density: float, rescale: bool, extra: dict, key, chunk: int) -> Pruner:
    """One task vector's pruner as `merge_gta` builds it (flat `base` and `model` in the merge's dtype), for a
    caller that keeps it across merges at other weights (refine/differentiable.py): DARE's mask is not kept (it is
    redrawn from its counter stream chunk by chunk), DELLA's is (one byte per element)."""
    p = _pruner(method.sparsification_method, base, model, density, rescale, extra, key, chunk)
    if p.key is not None:
        p.stored = None
    return p


def mask_into(p: Pruner, a: torch.Tensor, start: int, out: torch.Tensor, scratch: Scratch, spare=None) -> torch.Tensor:
    """out = p's keep mask for the chunk at `start` (0/1 in out's dtype); `a`: the chunk's magnitudes (read by
    magnitude pruning only), `spare`: a float buffer like `out` (breadcrumbs)."""
    return _mask_into(p, a, start, out, scratch, spare)


__all__ = ["Pruner", "Scratch", "agreement", "elected_sign", "frozen_pruner", "mask_into", "merge_gta"]
