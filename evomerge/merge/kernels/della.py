"""evomerge-1's DELLA mask: mergekit's magnitude-ranked keep probabilities, a counter-based draw.

mergekit (`sparsify.della_magprune`) ranks each row's magnitudes (along dim 1; a 1-D tensor is one row),
maps rank r of R to p = (density - epsilon) + 2 * epsilon * (r - 1) / (R - 1), in its work dtype, and keeps
an element with probability p. Here the ranking is a stable sort (equal magnitudes: the lower index ranks
lower), the probabilities are mergekit's formula in the same dtype, and the draw is the counter stream:
keep element j iff u_j < p_j * 2^32 (exact in float64). A row of one element gets p = density - epsilon
(mergekit divides 0 by 0 there and fails).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.merge.kernels.counter import random_bits

if TYPE_CHECKING:
    import torch

ROWS_CHUNK = 1 << 20  # elements ranked at once (their int64 sort indices are the big temporary)


def della_mask(
    base: torch.Tensor, model: torch.Tensor, density: float, epsilon: float, key: tuple[int, int], work: torch.dtype
) -> torch.Tensor:
    """uint8 0/1 per element (flat), for the delta model - base of `base`'s shape."""
    import torch

    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    shape = base.shape if base.dim() >= 2 else (1, base.numel())
    n = base.numel()
    out = torch.empty(n, dtype=torch.uint8, device=base.device)
    if len(shape) > 2:  # rank along dim 1 of the whole tensor (rare: no chunking)
        delta = (model.reshape(shape) - base.reshape(shape)).abs()
        index = torch.arange(n, device=base.device).view(shape).movedim(1, -1).reshape(-1, shape[1])
        keep = _keep(delta.movedim(1, -1).reshape(-1, shape[1]), density, epsilon, key, work, index)
        out[index.reshape(-1)] = keep.reshape(-1)
        return out
    rows, cols = shape
    step = max(1, ROWS_CHUNK // max(cols, 1))
    flat_b, flat_m = base.reshape(-1), model.reshape(-1)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lo, hi = r0 * cols, r1 * cols
        a = (flat_m[lo:hi] - flat_b[lo:hi]).abs_().view(r1 - r0, cols)
        out[lo:hi] = _keep(a, density, epsilon, key, work, None, start=lo).reshape(-1)
    return out


def _keep(a: torch.Tensor, density: float, epsilon: float, key, work, index=None, start: int = 0) -> torch.Tensor:
    """uint8 keep mask of rows `a` (magnitudes); `index`: flat indices of a's elements (else consecutive)."""
    import torch

    rows, cols = a.shape
    order = torch.sort(a, dim=1, stable=True).indices
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(cols, device=a.device).expand(rows, cols))
    ranks = position.to(work) + 1  # mergekit: argsort(argsort(...)).to(work_dtype) + 1
    del order, position
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1).nan_to_num_(0.0)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    if index is None:
        bits = random_bits(key, start, rows * cols, device=a.device).view(rows, cols)
    else:
        bits = _bits_at(key, index)
    u = bits.to(torch.float64).add_(2.0**31)
    return (u < probs.to(torch.float64) * 2.0**32).to(torch.uint8)


def _bits_at(key, index: torch.Tensor) -> torch.Tensor:
    flat = random_bits(key, 0, int(index.max().item()) + 1, device=index.device)
    return flat[index]


__all__ = ["della_mask"]
