"""A counter-based random stream for DARE/DELLA masks: 32 random bits per element, from its flat index.

    key = stream_key(seed, "model.layers.0.mlp.up_proj.weight", 1)   # (recipe seed, tensor name, input index)
    bits = random_bits(key, start=0, length=n)                        # int32; the same on any device and thread count

The bits of element j are a pure function of (key, j): a 32-bit integer hash (Chris Wellons' `lowbias32`
constants, key mixed in twice) computed with torch int32 ops, whose wrap-around multiplication and
bit operations are exact on every device. So a mask does not depend on the global RNG, on the order tensors
are merged in, on chunking, on the number of threads, or on CPU versus GPU.

    x = (j mod 2^32) + k0;  x ^= x >>> 16;  x *= 0x7feb352d;  x ^= k1;  x ^= x >>> 15;  x *= 0x846ca68b
    u = x read as a signed 32-bit integer, plus 2^31        (uniform on [0, 2^32))

(`>>>` is a logical shift; every operation is mod 2^32.) The high bits of the last product, which decide a
comparison against a threshold, depend on every input bit. Elements past 2^32 (no real tensor has them)
take a key derived from `j >> 32`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

M1, M2 = 0x7FEB352D, 0x846CA68B
SPAN = 1 << 32  # indices per key segment


def _s32(value: int) -> int:
    """`value` mod 2^32 as a signed 32-bit integer (what an int32 tensor holds)."""
    value &= 0xFFFFFFFF
    return value - SPAN if value >= 1 << 31 else value


def stream_key(seed: int, name: str, index: int) -> tuple[int, int]:
    """The (k0, k1) key of one input's stream for one tensor: a function of these three only."""
    digest = hashlib.sha256(f"evomerge-1:{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def _segment_key(key: tuple[int, int], segment: int) -> tuple[int, int]:
    if segment == 0:
        return key
    digest = hashlib.sha256(f"{key[0]}:{key[1]}:{segment}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def random_bits_into(
    key: tuple[int, int], start: int, out: torch.Tensor, scratch: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Fill the int32 `out` with the hashes of elements start .. start+len(out)-1 (signed; u = value + 2^31).

    `index` holds 0 .. len-1 (int32, at least len(out) long); `scratch` is an int32 buffer like `out`.
    The range must not cross a multiple of 2^32 (chunks of a power-of-two size never do).
    """
    import torch

    n = out.numel()
    k0, k1 = _segment_key(key, start // SPAN)
    x, y = out, scratch[:n]
    torch.add(index[:n], _s32(start + k0), out=x)
    _xorshift_(x, 16, y)
    x.mul_(_s32(M1))
    x.bitwise_xor_(_s32(k1))
    _xorshift_(x, 15, y)
    x.mul_(_s32(M2))
    return x


def _xorshift_(x: torch.Tensor, shift: int, y: torch.Tensor) -> None:
    """x ^= x >>> shift on int32 (torch's >> is arithmetic: mask off the copied sign bits)."""
    import torch

    torch.bitwise_right_shift(x, shift, out=y)
    y.bitwise_and_((1 << (32 - shift)) - 1)
    x.bitwise_xor_(y)


def random_bits(key: tuple[int, int], start: int, length: int, device=None) -> torch.Tensor:
    """The hashes of `length` elements from `start` (a fresh int32 tensor; for tests and small tensors)."""
    import torch

    out = torch.empty(length, dtype=torch.int32, device=device)
    scratch = torch.empty_like(out)
    index = torch.arange(length, dtype=torch.int32, device=device)
    pos = 0
    while pos < length:  # split at multiples of 2^32 (only for absurdly large tensors)
        end = min(length, (start + pos) // SPAN * SPAN + SPAN - start)
        random_bits_into(key, start + pos, out[pos:end], scratch[pos:end], index)
        pos = end
    return out


def keep_threshold(p: float) -> int:
    """The signed int32 bound t' such that `bits < t'` keeps with probability floor(p * 2^32) / 2^32."""
    t = min(SPAN, max(0, int(p * SPAN)))  # p * 2^32 is exact in float64; int() floors a non-negative value
    return t - (1 << 31)  # u < t  <=>  (u - 2^31) < (t - 2^31), and u - 2^31 is the signed value


__all__ = ["keep_threshold", "random_bits", "random_bits_into", "stream_key"]
