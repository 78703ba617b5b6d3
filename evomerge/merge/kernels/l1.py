"""L1 norms that do not depend on summation order: the same value on any device, thread count or chunking.

mergekit's DARE/DELLA (and `rescale: true`) scale a pruned task vector by sum|delta| / sum|kept delta|.
A float sum depends on the order it is added in (threads, chunk size, CPU or GPU), so evomerge-1 sums in
fixed point instead. Per block of BLOCK consecutive elements (aligned at flat index 0), with 2^e the
block's largest magnitude rounded up to a power of two, every magnitude x becomes the integer nearest to
x * 2^(21 - e) (float32, ties to even; the product is exact and below 2^21), so a block's integers sum
below 2^31, exactly in int32 in any order. The block sums are added exactly per exponent (int64) and
the per-exponent totals exactly in Python integers, then rounded once to float. Each magnitude is off by at
most 2^(e - 22), without bias, so the sum is within ~1e-8 (relative) of the exact one, and it is the same
bits everywhere. The kept sum uses the same blocks' scales.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 1024
SCALE_BITS = 21  # 1024 integers below 2^21 sum below 2^31: exact in int32
_ROUND = 1.5 * 2**23
MIN_EXPONENT = -100  # blocks whose largest magnitude is under 2^-100 lose precision; 2^(21 - e) stays a float32


def block_sums(
    a: torch.Tensor,
    mask: torch.Tensor | None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-point (sum|x|, sum|x| * mask, exponent e) per block of one chunk that starts at a multiple of
    BLOCK; `a` its magnitudes (flat), `mask` 0/1 floats of the same length (None: all kept); `scratch` a
    float32 and an int32 buffer at least as long (else allocated)."""
    import torch

    n = a.numel()
    if scratch is None:
        scratch = (
            torch.empty(n, dtype=torch.float32, device=a.device),
            torch.empty(n, dtype=torch.int32, device=a.device),
        )
    fbuf, ibuf = scratch[0][:n], scratch[1][:n]
    full = n // BLOCK * BLOCK
    parts = []
    for lo, hi, rows in ((0, full, full // BLOCK), (full, n, 1)):
        if hi > lo:
            view = lambda t: t[lo:hi].view(rows, -1)  # noqa: E731
            parts.append(_blocks(view(a), None if mask is None else view(mask), view(fbuf), view(ibuf)))
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def _blocks(x: torch.Tensor, mask: torch.Tensor | None, rounded: torch.Tensor, integers: torch.Tensor):
    import torch

    exponent = torch.frexp(x.amax(dim=1, keepdim=True).float()).exponent.clamp_(min=MIN_EXPONENT)
    scale = ((127 + SCALE_BITS - exponent) << 23).view(torch.float32)  # 2^(21 - e), built from its bits: exact
    # + 1.5 * 2^23 - 1.5 * 2^23 rounds a float32 below 2^22 to the nearest integer, half to even (IEEE
    # addition; cheaper than torch.round); half-up would bias: large values sit on a grid of eighths
    torch.mul(x, scale, out=rounded).add_(_ROUND).sub_(_ROUND)
    before = integers.copy_(rounded).sum(dim=1, dtype=torch.int32)  # integer-valued floats: exact conversion
    if mask is None:
        return before, before, exponent.flatten()
    after = integers.copy_(rounded.mul_(mask)).sum(dim=1, dtype=torch.int32)  # the kept ones' integers
    return before, after, exponent.flatten()


def totals(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(sum|x|, sum|x| * mask) over every block, each rounded once from the exact fixed-point total."""
    import torch

    if not parts:
        return 0.0, 0.0
    before, after, exponent = (torch.cat(column) for column in zip(*parts))
    levels, which = torch.unique(exponent, return_inverse=True)
    result = []
    for sums in (before, after):
        per_level = torch.zeros(len(levels), dtype=torch.int64, device=sums.device)
        per_level.index_add_(0, which, sums.to(torch.int64))
        low = int(levels.min().item())
        exact = sum(int(s) << (int(e) - low) for s, e in zip(per_level.tolist(), levels.tolist()))
        result.append(math.ldexp(float(exact), low - SCALE_BITS))
    return result[0], result[1]


def rescale_factor(before: float, after: float, dtype: torch.dtype, eps: float = 1e-7) -> float | None:
    """mergekit's `rescaled_masked_tensor` factor (before / after, both in `dtype`), or None where it
    returns the masked tensor unscaled (either norm below eps)."""
    import torch

    b, a = torch.tensor(before, dtype=dtype), torch.tensor(after, dtype=dtype)
    if b < eps or a < eps:
        return None
    return (b / a).item()


__all__ = ["BLOCK", "block_sums", "rescale_factor", "totals"]
