"""Magnitude selection without a sort: the first `count` elements of a tensor in evomerge-1's order.

The order: magnitude descending, and among equal magnitudes the lowest flat index first. Its first `count`
elements are every element above a threshold T (the count-th largest magnitude) plus the lowest-indexed
elements equal to T, up to a cut index. `TopK(T, cut)` says exactly that, so a chunk's mask is one
comparison against a scalar (`>= T` before the cut, `> T` from it on).

How T and the cut are found, in bounded memory and without an int64 per element:
1. a strided sample of the magnitudes (about 16K) brackets T between two of its quantiles, wide enough
   (5 standard deviations of a sample quantile) that the bracket holds T almost always;
2. one chunked pass counts the magnitudes above the bracket and gathers those inside it (masked_select,
   in flat-index order, with each chunk's count);
3. `kthvalue` among the gathered ones gives T, the gathered ones equal to T locate the chunk holding the
   cut, and that one chunk is recomputed to find it.
If the bracket misses T (a sample that is not representative), the pass is repeated with an unbounded
bracket: slower, same result. The result is exact and depends on the data only, never on the sample,
the chunk size, the number of threads or the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    # magnitudes(start, end, out): writes |delta| of elements start..end-1 into out[: end - start]
    Magnitudes = Callable[[int, int, torch.Tensor], torch.Tensor]

SAMPLE = 1 << 14  # sample size for the bracket
EXACT_BELOW = 1 << 16  # tensors this small are selected directly (kthvalue on all of them)


@dataclass(frozen=True)
class TopK:
    """Keep |x| > threshold anywhere, and |x| == threshold at flat indices below `cut`."""

    threshold: float
    cut: int

    def mask_into(self, a: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """out[i] = 1.0 if element start+i is selected else 0.0 (`a` its magnitudes; `out` float, same length)."""
        import torch

        n = a.numel()
        split = min(max(self.cut - start, 0), n)
        if split:
            torch.ge(a[:split], self.threshold, out=out[:split])
        if split < n:
            torch.gt(a[split:], self.threshold, out=out[split:])
        return out


ALL = TopK(0.0, 1 << 62)  # every element (magnitudes are >= 0)
NONE = TopK(math.inf, 0)


def top_k(
    n: int, count: int, magnitudes: Magnitudes, sample: Callable[[int], torch.Tensor], chunk: int, like: torch.Tensor
) -> TopK:
    """The first `count` of `n` elements in evomerge-1's order.

    `sample(stride)` returns the magnitudes of elements 0, stride, 2*stride, ...; `like` gives the dtype and
    device of the chunk buffers.
    """
    import torch

    if count <= 0:
        return NONE
    if count >= n:
        return ALL
    if n <= EXACT_BELOW:
        a = magnitudes(0, n, torch.empty(n, dtype=like.dtype, device=like.device))
        return _resolve(a, [n], count, 0, magnitudes, n, n, like)
    stride = max(1, n // SAMPLE) | 1  # odd: never in step with power-of-two row lengths
    lo, hi = _bracket(sample(stride), count / n)
    found = _gather(n, count, lo, hi, magnitudes, chunk, like)
    if found is None:  # the sample misled the bracket: gather everything (slower, same result)
        found = _gather(n, count, -math.inf, math.inf, magnitudes, chunk, like)
    candidates, sizes, above = found
    return _resolve(candidates, sizes, count, above, magnitudes, n, chunk, like)


def _bracket(sample: torch.Tensor, fraction: float) -> tuple[float, float]:
    """Magnitudes (lo, hi) that hold the count-th largest of the whole tensor with high probability."""
    m = sample.numel()
    expected = fraction * m  # the count-th largest is about the expected-th largest of the sample
    margin = 5 * math.sqrt(max(expected * (1 - fraction), 1.0)) + 2
    hi_rank, lo_rank = math.floor(expected - margin), math.ceil(expected + margin)  # ranks from the top
    values = _sortable(sample)
    hi = math.inf if hi_rank < 1 else values.kthvalue(m - hi_rank + 1).values.item()
    lo = -math.inf if lo_rank > m else values.kthvalue(m - lo_rank + 1).values.item()
    return lo, hi


def _gather(n: int, count: int, lo: float, hi: float, magnitudes: Magnitudes, chunk: int, like: torch.Tensor):
    """(magnitudes in [lo, hi] in flat order, how many per chunk, how many above hi), or None when the
    count-th largest is not inside [lo, hi]."""
    import torch

    from evomerge.merge.kernels.chunks import map_chunks

    size = min(n, chunk)
    unbounded = math.isinf(lo) and math.isinf(hi)

    def state():
        return (
            torch.empty(size, dtype=like.dtype, device=like.device),
            torch.empty(size, dtype=torch.float32, device=like.device),
            torch.empty(size, dtype=torch.float32, device=like.device),
        )

    def body(bufs, start: int, end: int):
        buf, over, inside = bufs
        a = magnitudes(start, end, buf)
        if unbounded:
            return 0.0, a.clone()
        o, i = over[: end - start], inside[: end - start]
        torch.gt(a, hi, out=o)  # float masks: comparisons into float are several times faster than into bool
        torch.ge(a, lo, out=i)
        i.sub_(o)  # 1 inside [lo, hi]
        return o.sum().item(), torch.masked_select(a, i.bool())  # a 0/1 float sum is exact below 2^24

    parts = map_chunks(n, chunk, body, state, like.device)
    above = int(sum(p[0] for p in parts))
    sizes = [p[1].numel() for p in parts]
    if not above < count <= above + sum(sizes):
        return None
    return torch.cat([p[1] for p in parts]), sizes, above


def _resolve(
    candidates: torch.Tensor,
    sizes: list[int],
    count: int,
    above: int,
    magnitudes: Magnitudes,
    n: int,
    chunk: int,
    like: torch.Tensor,
) -> TopK:
    """T = the (count - above)-th largest candidate; then the cut among the elements equal to T."""
    import torch

    c = candidates.numel()
    rank = count - above  # T's rank among the candidates, from the top
    threshold = _sortable(candidates).kthvalue(c - rank + 1).values.to(candidates.dtype)
    t = threshold.item()
    if t == 0:  # zeros stay zero whether kept or not: keep them all
        return ALL
    ties = count - above - int(torch.count_nonzero(candidates > threshold).item())  # equal to T and kept (>= 1)
    equal = candidates == threshold
    bounds = torch.tensor([0, *sizes], device=equal.device).cumsum(0)
    per_chunk = torch.cumsum(equal, 0, dtype=torch.int32)[(bounds[1:] - 1).clamp(min=0)] if c else bounds[1:] * 0
    per_chunk = torch.where(bounds[1:] > 0, per_chunk, 0).tolist()  # equal ones up to each chunk's end
    index = next(i for i, k in enumerate(per_chunk) if k >= ties)
    before = per_chunk[index - 1] if index else 0
    start = index * chunk
    end = min(n, start + chunk)
    a = magnitudes(start, end, torch.empty(end - start, dtype=like.dtype, device=like.device))
    positions = torch.nonzero(a == threshold).flatten()
    return TopK(t, start + int(positions[ties - before - 1].item()) + 1)


def _sortable(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype kthvalue handles everywhere, exactly (half types widen to float32; float64 stays)."""
    import torch

    return x if x.dtype in (torch.float32, torch.float64) else x.float()


__all__ = ["ALL", "NONE", "TopK", "top_k"]
