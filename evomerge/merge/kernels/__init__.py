"""evomerge's merge kernels, in two named sets; a recipe records the set its bytes came from.

    EVOMERGE_KERNELS=mergekit evomerge merge recipe.yaml --out OUT     # or --kernels mergekit

**`evomerge-1`** (the default). Non-sparsifying methods (linear, task_arithmetic, slerp, nuslerp,
model_stock, passthrough) give mergekit 0.1.5's exact bits. The sparsifying ones (ties, dare_ties,
dare_linear, della, della_linear, breadcrumbs, breadcrumbs_ties) follow mergekit's formulas with these
rules where mergekit leaves the result to an unstable sort or to the global RNG; each task vector
(delta = model - base) is pruned on its own:

- *Magnitude pruning* (ties): keep exactly k = max(1, int(density * n)) elements (mergekit's count): the
  first k in the order "magnitude descending, then lowest flat index first". So among elements whose
  magnitude equals the boundary value, the lowest flat indices are kept. Found without a sort
  (`select.py`: a sampled bracket, one counting pass, kthvalue among the few inside it).
- *Breadcrumbs* (magnitude_outliers): mergekit's counts (keep = int(density * n), drop the top
  int(gamma * n) outliers, fewer if needed to keep `keep`); in the same order, skip the first `top` and
  keep the next `keep`.
- *DARE* (random): keep element j iff u_j < floor(p * 2^32), p = density in the work dtype, with u_j the
  counter stream of (recipe seed, tensor name, input position) at index j (`counter.py`); then mergekit's
  rescale rule (`rescale: true`, the default for dare_*: times sum|delta| / sum|kept delta|).
- *DELLA*: mergekit's rank-based keep probabilities in density +/- epsilon (stable ranks, `della.py`),
  drawn from the same counter stream: keep iff u_j < p_j * 2^32; then mergekit's rescale rule.
- *Rescale sums* are exact fixed-point sums (`l1.py`), so they do not depend on summation order.
- Everything after the mask is mergekit's arithmetic, operation for operation (`gta.py`): given the same
  masks, the same bits. The work dtype is mergekit's CPU one (float32 for float16 DARE/DELLA).

Each result depends only on the inputs, the recipe and its seed: the same bytes for any thread count,
chunk size, tensor order, worker or device (every operation is elementwise, an exact integer or
fixed-point reduction, or an exact selection). So `mergekit-yaml` gives the same tensors as evomerge-1
except at boundary ties (ties, breadcrumbs) and in which random elements are dropped (DARE, DELLA).

**`mergekit-0.1.5`**: mergekit's own kernels for every method, for anyone who needs mergekit's exact bytes:
`merged_tensors` merges the tensors in mergekit-yaml's order (its schedule sorts them by input tensor name)
and the random masks come from one global RNG stream seeded once by the recipe seed, as `mergekit-yaml
--random-seed SEED` draws them (tests/test_mergekit_suite.py compares dare_ties and della bit for bit).

Both sets use `parity.py`'s faster kernels where they are bit-identical to mergekit's (slerp; ties under
mergekit-0.1.5). The evomerge-only methods (tsv_m, iso_c, iso_cts: `subspace.py`) have no mergekit kernel: both
sets run evomerge's, whose SVDs are reproducible on one machine and torch build (not across LAPACK builds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.merge.registry import names

if TYPE_CHECKING:
    import torch
    from mergekit.merge_methods import MergeMethod

EVOMERGE_1 = "evomerge-1"
MERGEKIT = "mergekit-0.1.5"
KERNEL_SETS = (EVOMERGE_1, MERGEKIT)
DEFAULT_KERNELS = EVOMERGE_1
ALIASES = {"evomerge": EVOMERGE_1, "mergekit": MERGEKIT}
ENV = "EVOMERGE_KERNELS"
SPARSIFYING = frozenset(names(sparsifies=True))  # the methods evomerge-1 has its own kernel for (merge/registry.py)


def canonical_kernels(name: str) -> str:
    """The kernel set's recorded name; ValueError naming the valid ones."""
    key = str(name).strip().lower()
    if key in KERNEL_SETS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(f"unknown kernel set {name!r}; valid: {', '.join(KERNEL_SETS)} (or {', '.join(ALIASES)})")


def default_kernels() -> str:
    """`EVOMERGE_KERNELS` if set, else evomerge-1: the set of a recipe that records none."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_KERNELS
    try:
        return canonical_kernels(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {ENV}: {exc}") from None


def kernel_merge(
    method: MergeMethod,
    params: Mapping[str, Any],
    tensors: Sequence[torch.Tensor],
    inputs: Sequence[str],
    base_model: str | None,
    out: torch.Tensor | None = None,
    *,
    kernels: str = DEFAULT_KERNELS,
    seed: int = 0,
    name: str = "",
) -> torch.Tensor | None:
    """The merged tensor by one of evomerge's kernels, or None where mergekit's own kernel runs.

    `params` is mergekit's parameter binding (shared values; per-input ones keyed by input id). With `out`
    (same shape, dtype and device), the result may be written there and `out` returned.
    """
    from evomerge.merge.kernels.parity import parity_merge
    from evomerge.merge.kernels.subspace import SVD_CACHE

    if SVD_CACHE.used and method.spec.name != "tsv_m":
        SVD_CACHE.clear()  # TSV-M's per-task SVDs serve the next TSV-M trials only (a portfolio merge leaves them)
    if not tensors or not tensors[0].is_floating_point() or tensors[0].numel() == 0:
        return None
    if out is not None and out.device != tensors[0].device:
        out = None
    if kernels == EVOMERGE_1 and method.spec.name in SPARSIFYING and base_model in inputs:
        from evomerge.merge.kernels.gta import merge_gta

        base = tensors[list(inputs).index(base_model)]
        others = [(key, i, t) for i, (key, t) in enumerate(zip(inputs, tensors)) if key != base_model]
        return merge_gta(method, base, others, params, out, seed=seed, name=name)
    if any(t.dtype != tensors[0].dtype for t in tensors):
        return None
    return parity_merge(method, params, tensors, inputs, base_model, out)


__all__ = [
    "DEFAULT_KERNELS",
    "ENV",
    "EVOMERGE_1",
    "KERNEL_SETS",
    "MERGEKIT",
    "SPARSIFYING",
    "canonical_kernels",
    "default_kernels",
    "kernel_merge",
]
