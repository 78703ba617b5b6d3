"""The subspace merges (evomerge-only): TSV-M, Iso-C and Iso-CTS, per weight matrix, on the SVD of the task vectors.

    from evomerge.merge.kernels import subspace
    delta = subspace.iso_c([tau_1, tau_2], weights=[1.0, 1.0])          # the merged task vector of one matrix
    theta = base + lam * delta

Each tensor's inputs are the base and the models; tau_i = model_i - base is model i's task vector, w_i its `weight`
(mergekit's per-model weight: it scales tau_i before anything else, so at weight 1 every formula is the paper's),
`lambda` the papers' scale alpha: theta = base + lambda * delta.

- A 2-D weight matrix (attention and MLP projections) merges by the method's subspace rule below.
- Every other tensor (norms, biases: vectors) and the embeddings and output head merge as the papers merge the
  parameters they leave out of the SVD: the mean of the task vectors (their reference code averages them),
  weighted: delta = sum_i w_i tau_i / sum_i w_i (divisor 1 where |sum_i w_i| < 1e-8, mergekit's rule for
  `normalize`); at equal weights it is the papers' mean. The embeddings and head are matrices, but rows of a
  lookup table (one per token) rather than a map between hidden states, and a 49152 x 576 SVD costs about 20 times
  a 576 x 576 one (bench/subspace_cost.py prints both): they stay out of the SVD, by name (merge/layout.py's
  EMBEDDING_PARTS).

Every SVD runs on the CPU in float32 (one thread, as every evomerge kernel inside `kernel_threads`), whatever device
the resident model lives on: so a GPU worker scores the very bytes `evomerge merge` writes on the CPU. An SVD's bytes
depend on the LAPACK build and processor: `evomerge merge` reproduces a recipe byte for byte on the machine (and
torch build) that merged it; elsewhere up to rounding. Recipes naming these methods are evomerge-only: mergekit has
no such method.

Cost (bench/subspace_cost.py): task arithmetic is a few elementwise passes; Iso-C adds one SVD of the summed matrix
per trial, Iso-CTS 3 + T SVDs (the sum, each of the T tasks' residuals, the two orthogonalisations). TSV-M's per-task
SVDs do not depend on the trial (a trial's weights only scale singular values and its rank fractions only pick how
many to keep), so each worker computes them once per matrix and model and keeps them (at most `SVD_CACHE_BYTES`,
float32 U, S, V^T: about 1.4x to 2x the matrix); a trial then costs the two orthogonalisations. A merge by any other
method empties the cache (`kernels.kernel_merge`): a search of another method that scores TSV-M's default merge in
its portfolio does not keep them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evomerge.merge.layout import EMBEDDING_PARTS

if TYPE_CHECKING:
    import torch

SVD_CACHE_BYTES = 4 << 30  # the per-task SVDs a worker keeps (TSV-M); past this, new ones are recomputed each trial
EPS = 1e-8  # mergekit's divisor guard for a normalised sum of weights


def takes_subspace_rule(name: str, tensor: torch.Tensor) -> bool:
    """Whether tensor `name` merges by the subspace rule: a 2-D weight matrix that is not an embedding or head."""
    return tensor.dim() == 2 and min(tensor.shape) > 1 and not any(part in name for part in EMBEDDING_PARTS)


def weighted_mean(task_vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i tau_i / sum_i w_i: the papers' mean of the task vectors for what they leave out of the SVD."""
    total = sum(weights)
    out = task_vectors[0] * weights[0]
    for tau, w in zip(task_vectors[1:], weights[1:]):
        out = out + tau * w
    return out / (total if abs(total) >= EPS else 1.0)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """P Q^T from the thin SVD a = P D Q^T: the orthonormal matrix nearest to `a` (the papers' orthogonalisation)."""
    import torch

    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def kept_ranks(rank: int, fractions: Sequence[float]) -> list[int]:
    """TSV-M's k_i = floor(r * f_i / max(1, sum_j f_j)): each task's kept singular directions, together at most r
    (so the concatenated directions can be orthonormal). f_i = 1 for every task gives floor(r / T), the paper's."""
    scale = max(1.0, float(sum(fractions)))
    return [int(rank * f / scale) for f in fractions]


def tsv_m(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    fractions: Sequence[float] | None = None,
    svds: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """TSV-M's merged task vector of one weight matrix (Gargiulo et al., "Task Singular Vectors: Reducing Task
    Interference in Model Merging", CVPR 2025, Sec. 5 "TSV-Merge", the merge of its Algorithm 1):

        tau_i = U_i S_i V_i^T,  keep the top k_i:  U_i,k  S_i,k  V_i,k      (k_i = r / T in the paper)
        U^ = [U_1,k ... U_T,k],  V^ = [V_1,k ... V_T,k],  S^ = blockdiag(w_1 S_1,k, ..., w_T S_T,k)
        U^ = P D Q^T  ->  U^_perp = P Q^T;  likewise V^_perp                 (orthogonal Procrustes)
        delta = U^_perp S^ V^_perp^T

    `weights` scale each task's singular values (w_i tau_i has them times w_i; a negative weight flips the
    direction, which the orthogonalisation carries through); `fractions` are the per-task rank fractions
    (`kept_ranks`; default 1 each: r / T); `svds` each tau_i's thin SVD (U, S, V^T) if already known (the cache).
    """
    import torch

    ks, svds = _kept(task_vectors, fractions, svds)
    if sum(ks) == 0:
        return torch.zeros_like(task_vectors[0])
    u_hat = torch.cat([u[:, :k] for (u, _, _), k in zip(svds, ks)], dim=1)
    v_hat = torch.cat([vh[:k].T for (_, _, vh), k in zip(svds, ks)], dim=1)
    s_hat = torch.cat([s[:k] * w for (_, s, _), k, w in zip(svds, ks, weights)])
    return (_polar(u_hat) * s_hat) @ _polar(v_hat).T


def _kept(
    task_vectors: Sequence[torch.Tensor],
    fractions: Sequence[float] | None,
    svds: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
) -> tuple[list[int], Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Each task's kept rank (`kept_ranks`; fractions default 1 each: r / T) and its thin SVD (given, or computed)."""
    import torch

    fractions = [1.0] * len(task_vectors) if fractions is None else fractions
    if svds is None:
        svds = [torch.linalg.svd(tau, full_matrices=False) for tau in task_vectors]
    return kept_ranks(min(task_vectors[0].shape), fractions), svds


def tsv_m_parts(
    task_vectors: Sequence[torch.Tensor],
    fractions: Sequence[float] | None = None,
    svds: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """[A_1 .. A_T] with `tsv_m(task_vectors, w, fractions) = sum_i w_i A_i` (up to rounding): A_i = task i's block
    of U^_perp S^ V^_perp^T at weight 1. The orthogonalised directions do not depend on the weights (a weight scales
    singular values; its sign flips a block, which the orthogonalisation carries through), so at fixed rank
    fractions TSV-M is linear in the weights and in lambda: the refinement's surrogate (refine/differentiable.py)."""
    import torch

    ks, svds = _kept(task_vectors, fractions, svds)
    if sum(ks) == 0:
        return [torch.zeros_like(task_vectors[0]) for _ in task_vectors]
    u_perp = _polar(torch.cat([u[:, :k] for (u, _, _), k in zip(svds, ks)], dim=1))
    v_perp = _polar(torch.cat([vh[:k].T for (_, _, vh), k in zip(svds, ks)], dim=1))
    parts, start = [], 0
    for (_, s, _), k in zip(svds, ks):
        block = slice(start, start + k)
        parts.append((u_perp[:, block] * s[:k]) @ v_perp[:, block].T)
        start += k
    return parts


def iso_c(task_vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Iso-C's merged task vector of one weight matrix (Marczak et al., "No Task Left Behind: Isotropic Model
    Merging with Common and Task-Specific Subspaces", ICML 2025, Sec. 4.1 "Isotropic merging in common subspace"):

        Delta_TA = sum_i w_i tau_i = U S V^T,   sigma_bar = (1/r) sum_j sigma_j   (r = min(m, n) values)
        delta = sigma_bar U V^T

    the task-arithmetic sum with its spectrum made flat (isotropic) at its mean singular value.
    """
    import torch

    total = task_vectors[0] * weights[0]
    for tau, w in zip(task_vectors[1:], weights[1:]):
        total = total + tau * w
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh)


def common_size(rank: int, fraction: float, tasks: int) -> tuple[int, int]:
    """Iso-CTS's (k, s): k common directions and s per task, with k + T s = r and k >= r * fraction (the paper's
    k = fraction * r, the task-specific rest divided equally: s = floor((r - k) / T), the remainder to the common)."""
    k = int(rank * fraction)
    s = (rank - k) // tasks
    return rank - tasks * s, s


def iso_cts(task_vectors: Sequence[torch.Tensor], weights: Sequence[float], fraction: float) -> torch.Tensor:
    """Iso-CTS's merged task vector of one weight matrix (Marczak et al., ICML 2025, Sec. 4.2 "Isotropic merging in
    common and task-specific subspaces", its Algorithm 1):

        Delta_TA = sum_i w_i tau_i = U S V^T;  common subspace: U_1:k, V_1:k, S_1:k   (k, s: `common_size`)
        tau_i' = w_i tau_i - U_1:k U_1:k^T w_i tau_i = U'_i S'_i V'_i^T   (projected off the common subspace)
        U* = [U_1:k, U'_1,1:s, ..., U'_T,1:s],  V* likewise;  U* -> P Q^T from U* = P D Q^T, V* likewise
        sigma_bar = mean of [S_1:k, S'_1,1:s, ..., S'_T,1:s]   (r values)
        delta = sigma_bar U*_perp V*_perp^T

    `fraction` is the common subspace's share of the rank (1: Iso-C).
    """
    import torch

    weighted = [tau * w for tau, w in zip(task_vectors, weights)]
    total = weighted[0]
    for tau in weighted[1:]:
        total = total + tau
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    k, per_task = common_size(min(total.shape), fraction, len(weighted))
    us, vs, values = [u[:, :k]], [vh[:k].T], [s[:k]]
    if per_task:
        common = u[:, :k]
        for tau in weighted:
            u_t, s_t, vh_t = torch.linalg.svd(tau - common @ (common.T @ tau), full_matrices=False)
            us.append(u_t[:, :per_task])
            vs.append(vh_t[:per_task].T)
            values.append(s_t[:per_task])
    sigma_bar = torch.cat(values).mean()
    return sigma_bar * (_polar(torch.cat(us, dim=1)) @ _polar(torch.cat(vs, dim=1)).T)


# -- the per-tensor merge (what `evomerge merge` and a worker run) -----------------------------------------------
class _SvdCache:
    """Each task vector's thin SVD, keyed by (tensor name, input, its inputs' bytes): what TSV-M's trials share."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, key: tuple, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        found = self.entries.get(key)
        if found is not None:
            return found
        found = torch.linalg.svd(tau, full_matrices=False)
        size = sum(t.numel() * t.element_size() for t in found)
        if self.used + size <= self.budget:
            self.entries[key] = found
            self.used += size
        return found

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


SVD_CACHE = _SvdCache(SVD_CACHE_BYTES)


def _digest(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes' digest (a cache key that a changed input can never match)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(flat.numpy(), digest_size=16).digest()


def task_svds(
    name: str, base: torch.Tensor, models: Sequence[torch.Tensor], taus: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each task vector's thin SVD, from the cache where the same inputs' bytes were seen (`SVD_CACHE`): the key is
    the tensor's name and the digests of the base's and the model's bytes, so a changed input is a new key."""
    base_key = _digest(base)
    shape, dtype = tuple(base.shape), str(base.dtype)
    return [SVD_CACHE.get((name, shape, dtype, base_key, _digest(m)), tau) for m, tau in zip(models, taus)]


def merge_group(method: str, group: Any, weight: Any, params: dict[str, Any]) -> torch.Tensor:
    """theta = base + lambda * delta for one tensor group (mergekit's TensorGroup: the base and the models),
    `weight` the per-model weights (mergekit's PerInputValues), `params` the other bound parameters."""
    import torch

    base_entry = group.base
    others = group.non_base
    base = base_entry.tensor
    name = group.metadata.name or ""
    weights = [float(weight[e.id]) for e in others]
    cpu_base = base.detach().to("cpu", torch.float32)
    taus = [e.tensor.detach().to("cpu", torch.float32) - cpu_base for e in others]
    if not takes_subspace_rule(name, base):
        delta = weighted_mean(taus, weights)
    elif method == "iso_c":
        delta = iso_c(taus, weights)
    elif method == "iso_cts":
        delta = iso_cts(taus, weights, float(params["common_fraction"]))
    else:
        svds = task_svds(name, base, [e.tensor for e in others], taus)
        fractions = [float(params["rank_fraction"][e.id]) for e in others]
        delta = tsv_m(taus, weights, fractions, svds)
    merged = cpu_base + float(params["lambda"]) * delta
    return merged.to(device=base.device, dtype=base.dtype)


__all__ = [
    "SVD_CACHE",
    "SVD_CACHE_BYTES",
    "common_size",
    "iso_c",
    "iso_cts",
    "kept_ranks",
    "merge_group",
    "takes_subspace_rule",
    "task_svds",
    "tsv_m",
    "tsv_m_parts",
    "weighted_mean",
]
