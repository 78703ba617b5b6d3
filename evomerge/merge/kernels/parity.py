"""Faster kernels bit-identical to mergekit 0.1.5's, used by both kernel sets where they apply.

These run the same floating-point operations in the same order as mergekit, so the results are equal, not
merely close; what they change is where the work goes:

- **TIES magnitude pruning** (the `mergekit-0.1.5` set only; `evomerge-1` has its own rule): mergekit
  ranks every element with a full `argsort` to keep the top `k`; here one `kthvalue` finds the k-th
  largest magnitude and `|delta| >= threshold` is the same mask whenever that threshold is unique (when
  several elements tie at a non-zero threshold, which of them mergekit keeps is decided by its unstable
  argsort, so this falls back to mergekit's own function).
- **TIES merge** (mergekit's generalized task arithmetic): deltas are computed and pruned in place in one
  preallocated buffer and the result is written straight into the destination.
- **SLERP** (both sets): the same chunked statistics, but the per-chunk products reuse two buffers and the
  output chunks are written into the destination.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from mergekit.merge_methods import MergeMethod


def magnitude_(delta: torch.Tensor, density: float, rescale_norm: Any = None) -> torch.Tensor:
    """In place: what `mergekit.sparsify.magnitude(delta, density, rescale_norm)` returns, in `delta`."""
    from mergekit.sparsify import magnitude

    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return delta.zero_()
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    threshold = w.kthvalue(n - k + 1).values
    keep = w >= threshold
    if threshold != 0 and int(keep.sum()) != k:
        # Ties at the boundary: which of them mergekit keeps depends on its argsort; use its function.
        return delta.copy_(magnitude(delta.clone(), density=density, rescale_norm=rescale_norm))
    # A zero delta is zero whether kept or not, so a zero threshold (k > non-zeros) gives the same result.
    mask = keep.to(delta.dtype).reshape_as(delta)
    return _rescaled_mask_(delta, mask, rescale_norm)


def _rescaled_mask_(tensor: torch.Tensor, mask: torch.Tensor, norm: Any, eps: float = 1e-7) -> torch.Tensor:
    """In place: `mergekit.sparsify.rescaled_masked_tensor(tensor, mask, norm)`."""
    from mergekit.sparsify import RescaleNorm

    if norm is None:
        return tensor.mul_(mask)
    if norm == RescaleNorm.l1:
        before = tensor.abs().sum()
        after = tensor.mul_(mask).abs().sum()
    elif norm == RescaleNorm.l2:
        before = tensor.norm()
        after = tensor.mul_(mask).norm()
    elif norm == RescaleNorm.linf:
        before = tensor.abs().max()
        after = tensor.mul_(mask).abs().max()
    else:
        raise NotImplementedError(norm)
    if before < eps or after < eps:
        return tensor
    return tensor.mul_(before / after)


def task_arithmetic_into(
    method: Any,
    base: torch.Tensor,
    others: Sequence[tuple[str, torch.Tensor]],
    params: Mapping[str, Any],
    out: torch.Tensor | None,
) -> torch.Tensor:
    """`GeneralizedTaskArithmeticMerge.merge_group` with the deltas pruned in place; result into `out`."""
    import torch
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    if not others:
        return _emit(base, out)
    sparsification = method.sparsification_method
    rescale = RescaleNorm.l1 if params["rescale"] else None
    deltas = base.new_empty((len(others), *base.shape))
    for index, (key, tensor) in enumerate(others):
        delta = torch.sub(tensor, base, out=deltas[index])
        if not sparsification:
            continue
        density = params["density"][key]
        if sparsification == SparsificationMethod.magnitude:
            magnitude_(delta, density, rescale)
        else:  # any other sparsifier: mergekit's own
            extra = {k: params[k][key] for k in ("gamma", "epsilon") if k in params}
            delta.copy_(sparsify(delta.clone(), density=density, method=sparsification, rescale_norm=rescale, **extra))
    weights = torch.tensor([params["weight"][key] for key, _ in others], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if method.consensus_method:
        mask = get_mask(
            deltas, method=method.consensus_method, mask_dtype=torch.int8 if params["int8_mask"] else base.dtype
        )
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    if out is not None and out.dtype == base.dtype == mixed.dtype and out.shape == base.shape:
        return torch.add(base, mixed, out=out)
    return (base + mixed).to(base.dtype)


def slerp_into(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`mergekit.merge_methods.slerp.slerp` for one tensor (v0 the base), written chunk by chunk into `out`."""
    import torch
    from mergekit.merge_methods.slerp import _CHUNK_ELEMENTS

    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    n = a.shape[1]
    tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)  # mergekit's coefficient dtype is this too
    eps, dot_threshold = 1e-8, 0.9995
    chunk = _CHUNK_ELEMENTS
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]), dim=0
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]), dim=0
    )
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    bx = torch.empty((1, min(chunk, n)), dtype=dtype, device=v0.device)
    by = torch.empty_like(bx)
    dot_parts = []
    for s, e in spans:
        x, y = bx[:, : e - s], by[:, : e - s]
        torch.div(a[:, s:e].to(dtype), norm_a, out=x)
        torch.div(b[:, s:e].to(dtype), norm_b, out=y)
        dot_parts.append(x.mul_(y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    direct = out is not None and out.dtype == v0.dtype == dtype and out.shape == v0.shape and out.is_contiguous()
    result = out.view(1, -1) if direct else torch.empty_like(a)
    for s, e in spans:
        x, y = bx[:, : e - s], by[:, : e - s]
        o = result[:, s:e] if result.dtype == dtype else x
        torch.mul(a[:, s:e].to(dtype), coef_a, out=o)
        torch.mul(b[:, s:e].to(dtype), coef_b, out=y)
        o.add_(y)
        if o is x:
            result[:, s:e] = x
    return out if direct else result.reshape(v0.shape)


def parity_merge(
    method: MergeMethod,
    params: Mapping[str, Any],
    tensors: Sequence[torch.Tensor],
    inputs: Sequence[str],
    base_model: str | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The merged tensor by a mergekit-identical fast kernel, or None where none applies.

    `params` is the parameter binding mergekit's kernel would get: shared values, and per-input ones as a
    mapping from input id to value. With `out` (same shape, dtype and device), the result is written there.
    """
    kernel = PARITY_KERNELS.get(method.spec.name)
    return kernel(method, params, tensors, inputs, base_model, out) if kernel else None


def _gta(method, params, tensors, inputs, base_model, out):
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    if not isinstance(method, GeneralizedTaskArithmeticMerge) or base_model not in inputs:
        return None
    base = tensors[list(inputs).index(base_model)]
    others = [(key, t) for key, t in zip(inputs, tensors) if key != base_model]
    return task_arithmetic_into(method, base, others, params, out)


def _slerp(method, params, tensors, inputs, base_model, out):
    if len(tensors) != 2 or base_model not in inputs:
        return None
    i = list(inputs).index(base_model)
    return slerp_into(float(params["t"]), tensors[i], tensors[1 - i], out)


def _emit(tensor: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None and out.dtype == tensor.dtype and out.shape == tensor.shape:
        return out.copy_(tensor)
    return tensor


# Only where bench/merge_speed.py measured >= 1.5x (2026-11-22, 50M params, 2 cores): ties 1.5x, slerp 2.8x.
# DARE gained nothing under parity (its cost is mergekit's bernoulli draws), so under `mergekit-0.1.5` the
# dare/della/breadcrumbs methods keep mergekit's kernels.
PARITY_KERNELS: dict[str, Callable[..., Any]] = {"ties": _gta, "slerp": _slerp}

__all__ = ["PARITY_KERNELS", "magnitude_", "parity_merge", "slerp_into", "task_arithmetic_into"]
