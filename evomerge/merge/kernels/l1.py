"""L1 norms that do not depend on summation order: the same value on any device, thread count or chunking.

mergekit's DARE/DELLA (and `rescale: true`) scale a pruned task vector by sum|delta| / sum|kept delta|.
A float sum depends on the order it is added in (threads, chunk size, CPU or GPU), so evomerge-1 sums in
fixed point instead: per block of BLOCK consecutive elements (aligned at flat index 0), every magnitude is
scaled by 2^(40 - e), with 2^e the block's largest magnitude rounded up to a power of two, and rounded to an
integer (half to even; below 2^40, and exact in float32 from 2^24 up, so only magnitudes under 2^-16 of the
block's largest are rounded at all). A block's integers sum to less than 2^52, exactly in float64 in any
order, and the block totals, scaled back, are added with `math.fsum` (correctly rounded). The result is
within ~1e-12 (relative) of the exact sum and is the same bits everywhere.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 4096
SCALE_BITS = 40  # 4096 integers below 2^40 sum below 2^52: exact in float64
MIN_EXPONENT = -80  # blocks whose largest magnitude is under 2^-80 lose precision; keeps 2^(40 - e) finite in float32


def block_sums(a: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-point (sum|x|, sum|x| * mask, shift) per block of one chunk that starts at a multiple of BLOCK;
    `a` its magnitudes (flat), `mask` 0/1 floats of the same length (None: all kept)."""
    import torch

    full = a.numel() // BLOCK * BLOCK
    parts = []
    if full:
        parts.append(_blocks(a[:full].view(-1, BLOCK), None if mask is None else mask[:full].view(-1, BLOCK)))
    if full < a.numel():
        parts.append(_blocks(a[full:].view(1, -1), None if mask is None else mask[full:].view(1, -1)))
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def _blocks(x: torch.Tensor, mask: torch.Tensor | None):
    import torch

    x = x.float()
    top = x.amax(dim=1, keepdim=True)
    exponent = torch.frexp(top).exponent.clamp_(min=MIN_EXPONENT)
    q = (x * torch.ldexp(torch.ones_like(top), SCALE_BITS - exponent)).round_()
    before = q.sum(dim=1, dtype=torch.float64)
    after = before if mask is None else q.mul_(mask).sum(dim=1, dtype=torch.float64)
    return before, after, exponent.flatten() - SCALE_BITS


def totals(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(sum|x|, sum|x| * mask) of every block, each correctly rounded to float64 (`math.fsum`)."""
    import torch

    if not parts:
        return 0.0, 0.0
    before, after, shifts = (torch.cat(column).tolist() for column in zip(*parts))
    return (math.fsum(math.ldexp(v, s) for v, s in zip(before, shifts)),
            math.fsum(math.ldexp(v, s) for v, s in zip(after, shifts)))


def rescale_factor(before: float, after: float, dtype: torch.dtype, eps: float = 1e-7) -> float | None:
    """mergekit's `rescaled_masked_tensor` factor (before / after, both in `dtype`), or None where it
    returns the masked tensor unscaled (either norm below eps)."""
    import torch

    b, a = torch.tensor(before, dtype=dtype), torch.tensor(after, dtype=dtype)
    if b < eps or a < eps:
        return None
    return (b / a).item()


__all__ = ["BLOCK", "block_sums", "rescale_factor", "totals"]
