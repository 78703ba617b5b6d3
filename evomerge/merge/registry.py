"""Every merge method evomerge runs, in one table: one entry per method, named as mergekit 0.1.5 names it.

    from evomerge.merge.registry import REGISTRY, method_info
    method_info("ties").params["density"].interval       # (0, 1]
    [m.name for m in REGISTRY.values() if m.portfolio]    # the default merges every search is measured against

An entry says everything the rest of evomerge needs to know about a method, so every list derives from here:

- `params`: its parameters as mergekit declares them (default, per model or shared; tests/test_registry.py checks
  them against mergekit's own spec) and the interval a value must lie in (recipes and search spaces are checked
  against it; a parameter without one only has to be finite);
- `max_models`: how many models it merges into `base_model` at most (slerp: 1);
- `sparsifies`: evomerge-1 has a kernel of its own for it (`merge/kernels/gta.py`, the deterministic masks); the
  others run mergekit's kernels, or bit-identical faster ones, under both kernel sets;
- `refinable`: its merge is base + lambda * (weighted, optionally sparsified, task vectors [/ normaliser]), the
  formula the gradient refinement differentiates (`refine/tensor.py`); TSV-M is that at fixed rank fractions, on
  fixed parts of its task vectors (`refine/differentiable.py`'s `freeze_tsv_m`);
- `space`: its default search space (`search_spaces/<space>.yaml`, which lists the method under `methods:`), or
  `no_space` saying why it has none (then it has no default merge);
- `portfolio`: every search scores its default merge (in registry order) as a reference for the overfitting
  guard, status, export and the report (`evomerge/candidate/portfolio.py`);
- `evomerge_only`: a method mergekit does not have (the subspace merges, `merge/kernels/subspace.py`): evomerge
  builds its spec from this entry, `evomerge merge` runs it, a recipe naming it says it is evomerge-only and
  mergekit-yaml refuses it; its reference is the paper's formula (tests/test_subspace.py), not a parity case;
- `no_refine`: why a method outside the task-arithmetic family has no surrogate for the gradient refinement.

Adding a method mergekit registers: one entry here (`space=None` with a reason, no kernel, is a complete entry),
a parity case in tests/test_merge_parity.py, and where it is worth searching, a space in search_spaces/ that lists
it. A method that sparsifies gets a kernel in merge/kernels/gta.py before `sparsifies=True`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Interval:
    """Where a numeric parameter's values may lie: [low, high], each end open or closed."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = True

    def __contains__(self, x: float) -> bool:
        above = self.low <= x if self.low_closed else self.low < x
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def __str__(self) -> str:
        return f"{'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"


REQUIRED = object()  # a parameter's default when a recipe must set it (mergekit's required parameters)


@dataclass(frozen=True)
class Param:
    """One of a method's parameters, as mergekit 0.1.5 declares it, with the interval its values must lie in."""

    default: Any = REQUIRED
    per_model: bool = False  # mergekit's INPUT / NON_BASE scopes: one value per merged model, else one shared value
    interval: Interval | None = None  # None: any finite number (booleans and strings as mergekit validates them)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodInfo:
    name: str  # mergekit's name for it
    params: Mapping[str, Param]
    space: str | None  # its default search space, search_spaces/<space>.yaml; None: see `no_space`
    portfolio: bool  # every search scores its default merge (needs a space)
    no_space: str = ""  # why it has no search space (and so no default merge)
    max_models: int | None = None  # models merged into base_model at most; None: any number
    sparsifies: bool = False  # evomerge-1 has its own (deterministic) kernel for it
    refinable: bool = False  # the gradient refinement can move its weights
    endpoints: bool = False  # its `t` runs from base_model (0) to the other model (1): both ends are baselines
    evomerge_only: bool = False  # mergekit has no such method: evomerge's own kernel, recipes say evomerge-only
    paper: str = ""  # where an evomerge-only method is defined
    no_refine: str = ""  # why an evomerge-only method has no refinement surrogate


DENSITY = Interval(0.0, 1.0, low_closed=False)
NON_NEGATIVE = Interval(0.0, math.inf, high_closed=False)
POSITIVE = Interval(
    0.0, math.inf, low_closed=False, high_closed=False
)  # mergekit divides by it (DARE's rescale) and keeps int(d * n)
UNIT = Interval(0.0, 1.0)
BELOW_ONE = Interval(0.0, 1.0, high_closed=False)  # breadcrumbs' gamma, DELLA's epsilon: fractions, never all


def _gta(normalize: bool, rescale: bool, **extra: Param) -> dict[str, Param]:
    """The generalized-task-arithmetic family's parameters (mergekit's GeneralizedTaskArithmeticMerge)."""
    return {
        "int8_mask": Param(False),
        "normalize": Param(normalize),
        "rescale": Param(rescale),
        "lambda": Param(1.0),
        "weight": Param(per_model=True),
        "density": Param(1.0, per_model=True, interval=DENSITY),
        **extra,
    }


_SVD_SURROGATE = (
    "its merge is not linear in the weights (the spectrum of their weighted sum is flattened): a surrogate would "
    "take an SVD and its backward of every weight matrix, whole, at each refinement step (60 by default), over 60 "
    "times a trial's merge (bench/subspace_cost.py), where the refinement streams task vectors chunk by chunk; "
    "weight and lambda are searched per layer group instead"
)

# Order matters where lists derive from it: the portfolio scores (and the report lists) its methods in this order,
# and error messages list the valid names in it.
_METHODS = [
    MethodInfo(
        "linear",
        {"weight": Param(per_model=True), "normalize": Param(True)},
        space=None,
        no_space="a weighted average of the models themselves; task_arithmetic's space searches the same weights "
        "as task vectors around the base",
        portfolio=False,
    ),
    MethodInfo("task_arithmetic", _gta(False, False), space="task_arithmetic", portfolio=True, refinable=True),
    MethodInfo("ties", _gta(True, False), space="ties", portfolio=True, sparsifies=True, refinable=True),
    MethodInfo("dare_ties", _gta(False, True), space="dare_ties", portfolio=True, sparsifies=True, refinable=True),
    MethodInfo(
        "della",
        _gta(True, True, epsilon=Param(0.15, per_model=True, interval=BELOW_ONE)),
        space="della",
        portfolio=True,
        sparsifies=True,
        refinable=True,
    ),
    MethodInfo(
        "breadcrumbs",
        _gta(False, False, gamma=Param(0.01, per_model=True, interval=BELOW_ONE)),
        space="breadcrumbs",
        portfolio=True,
        sparsifies=True,
        refinable=True,
    ),
    MethodInfo("slerp", {"t": Param(interval=UNIT)}, space="slerp", portfolio=True, max_models=1, endpoints=True),
    MethodInfo(
        "nuslerp",
        {"weight": Param(per_model=True), "nuslerp_row_wise": Param(False), "nuslerp_flatten": Param(True)},
        space=None,
        no_space="no shipped space yet: its weights interpolate spherically between two models",
        portfolio=False,
    ),
    MethodInfo("dare_linear", _gta(False, True), space="dare_ties", portfolio=False, sparsifies=True, refinable=True),
    MethodInfo(
        "breadcrumbs_ties",
        _gta(False, False, gamma=Param(0.01, per_model=True, interval=BELOW_ONE)),
        space="ties",
        portfolio=False,
        sparsifies=True,
        refinable=True,
    ),
    MethodInfo(
        "della_linear",
        _gta(False, True, epsilon=Param(0.15, per_model=True, interval=BELOW_ONE)),
        space="della",
        portfolio=False,
        sparsifies=True,
        refinable=True,
    ),
    MethodInfo(
        "model_stock",
        {"filter_wise": Param(False)},
        space=None,
        no_space="nothing to search: its weights are computed from the task vectors' angles",
        portfolio=False,
    ),
    MethodInfo(
        "passthrough",
        {"scale": Param(None, per_model=True)},
        space=None,
        no_space="copies one model's tensors (scaled): a building block of slices, not a merge to search",
        portfolio=False,
    ),
    # SCE: task vectors masked to the select_topk share of elements where the models vary most, signs elected as
    # TIES does, each model weighted by its mean squared delta (computed, not searched)
    MethodInfo(
        "sce",
        {"int8_mask": Param(False), "select_topk": Param(1.0, interval=UNIT)},
        space="sce",
        portfolio=True,
    ),
    # Multi-SLERP: barycentric interpolation on the hypersphere of the task vectors (around base_model)
    MethodInfo(
        "multislerp",
        {
            "weight": Param(per_model=True),
            "normalize_weights": Param(True),
            "eps": Param(1e-8, interval=POSITIVE),
        },
        space="multislerp",
        portfolio=True,
    ),
    # NearSwap: takes the other model's value where it is within about t of the base's (weight t / |a - b|)
    MethodInfo("nearswap", {"t": Param(interval=NON_NEGATIVE)}, space="nearswap", portfolio=False, max_models=1),
    MethodInfo(
        "karcher",
        {
            "max_iter": Param(10, interval=Interval(1, math.inf, high_closed=False)),
            "tol": Param(1e-5, interval=POSITIVE),
        },
        space=None,
        no_space="nothing to search: the equal-weight Karcher mean of the models (max_iter and tol only tune its "
        "convergence)",
        portfolio=False,
    ),
    MethodInfo(
        "arcee_fusion",
        {},
        space=None,
        no_space="no parameters: its mask is a fixed quantile rule on the importance of each element",
        portfolio=False,
        max_models=1,
    ),
    MethodInfo(
        "ram",
        {"epsilon": Param(1e-5, interval=NON_NEGATIVE)},
        space=None,
        no_space="only epsilon, the magnitude below which a delta counts as zero: a tolerance, not a recipe choice; "
        "ramplus_tl's space searches its family",
        portfolio=False,
    ),
    # RAM+ (tensor-local): RAM's overlap averaging, each model's unique elements scaled up by 1 + r * min(rho, alpha)
    MethodInfo(
        "ramplus_tl",
        {
            "r": Param(0.1, interval=NON_NEGATIVE),
            "alpha": Param(0.2, interval=NON_NEGATIVE),
            "epsilon": Param(1e-5, interval=NON_NEGATIVE),
        },
        space="ramplus_tl",
        portfolio=False,
    ),
    # The subspace merges (evomerge-only; merge/kernels/subspace.py): per weight matrix on the SVD of the task
    # vectors; vectors, embeddings and head by the weighted mean of the task vectors, as the papers do
    MethodInfo(
        "tsv_m",
        {
            "weight": Param(1.0, per_model=True),
            "lambda": Param(1.0),
            "rank_fraction": Param(1.0, per_model=True, interval=UNIT),
        },
        space="tsv_m",
        portfolio=True,
        evomerge_only=True,
        paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
        refinable=True,  # linear in weight and lambda at fixed rank fractions (refine/differentiable.py's freeze_tsv_m)
    ),
    MethodInfo(
        "iso_c",
        {"weight": Param(1.0, per_model=True), "lambda": Param(1.0)},
        space="iso_c",
        portfolio=True,
        evomerge_only=True,
        paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
        "Subspaces, ICML 2025",
        no_refine=_SVD_SURROGATE,
    ),
    MethodInfo(
        "iso_cts",
        {"weight": Param(1.0, per_model=True), "lambda": Param(1.0), "common_fraction": Param(0.8, interval=UNIT)},
        space="iso_cts",
        portfolio=True,
        evomerge_only=True,
        paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
        "Subspaces, ICML 2025",
        no_refine=_SVD_SURROGATE,
    ),
]
REGISTRY: dict[str, MethodInfo] = {m.name: m for m in _METHODS}


def method_info(name: str) -> MethodInfo:
    """The registry's entry (KeyError for an unknown name; `merge.methods.get_method` says it to the user)."""
    return REGISTRY[name]


def names(**where: Any) -> tuple[str, ...]:
    """The registered methods whose entry has every given attribute value, in registry order:
    `names(sparsifies=True)`, `names(portfolio=True)`."""
    return tuple(m.name for m in REGISTRY.values() if all(getattr(m, k) == v for k, v in where.items()))


def interval(methods: list[str] | tuple[str, ...], param: str) -> Interval | None:
    """The interval `param` must lie in for every one of `methods` that has it (the first registered one that
    bounds it: a parameter name means one thing across the methods that share it)."""
    for name in methods:
        info = REGISTRY.get(name)
        if info is not None and param in info.params and info.params[param].interval is not None:
            return info.params[param].interval
    return None


__all__ = ["REGISTRY", "REQUIRED", "Interval", "MethodInfo", "Param", "interval", "method_info", "names"]
