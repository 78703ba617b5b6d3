"""Which recipes `mergekit-yaml` reproduces, and how closely: a portable recipe is plain mergekit YAML.

    from evomerge.merge.portability import portable, mergekit_line
    portable(recipe)            # False: per-row coefficients, or a method mergekit 0.1.5 does not register
    mergekit_line(recipe)       # what `mergekit-yaml recipe.yaml OUT` gives, for the model card

A recipe is portable when mergekit 0.1.5 can merge it: its method is one mergekit registers and it names no
coefficient file (per-row coefficients, which mergekit ignores: it would merge another model). How close
mergekit's tensors are to evomerge's follows from the method: the same tensors for the non-sparsifying methods
(either kernel set gives mergekit's bits); the sparsifying ones (ties, dare_*, della*, breadcrumbs*) give the same
model up to which elements are kept at magnitude ties and which random elements DARE and DELLA drop
(`merge/kernels/__init__.py` states evomerge's rules; mergekit draws its masks from its own global RNG).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.merge.recipe import Recipe

# mergekit 0.1.5's registered methods (tests/test_portability.py checks this against mergekit's registry; importing
# mergekit here would cost `evomerge status` seconds)
MERGEKIT_METHODS = frozenset(
    {
        "arcee_fusion",
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "karcher",
        "linear",
        "model_stock",
        "multislerp",
        "nearswap",
        "nuslerp",
        "passthrough",
        "ram",
        "ramplus_tl",
        "sce",
        "slerp",
        "task_arithmetic",
        "ties",
    }
)


def portable(recipe: Recipe) -> bool:
    """Whether `mergekit-yaml` merges this recipe as evomerge does (see the module's note on sparsifying methods)."""
    return not recipe.evomerge_only and recipe.merge_method in MERGEKIT_METHODS


def why_not_portable(recipe: Recipe) -> str | None:
    """Why `mergekit-yaml` merges another model from this recipe (None: it is portable)."""
    if recipe.merge_method not in MERGEKIT_METHODS:
        return f"mergekit 0.1.5 has no {recipe.merge_method} method"
    if recipe.evomerge is not None and recipe.evomerge.coefficients is not None:
        return "mergekit ignores its per-row coefficient file"
    if recipe.evomerge_only:
        return "it is evomerge-only"
    return None


def portable_text(text: str | None) -> bool:
    """`portable` of a recipe's YAML text, without validating it (a study holds hundreds: `status` reads them all)."""
    import yaml

    if not text:
        return False
    data: Any = yaml.safe_load(text)
    if not isinstance(data, dict):
        return False
    coefficients = (data.get("evomerge") or {}).get("coefficients")
    return coefficients is None and data.get("merge_method") in MERGEKIT_METHODS


def exact(recipe: Recipe) -> bool:
    """Whether `mergekit-yaml` gives this portable recipe's exact tensors (not only the same model up to masks)."""
    from evomerge.merge.kernels import SPARSIFYING

    return portable(recipe) and recipe.merge_method not in SPARSIFYING


def mergekit_line(recipe: Recipe) -> str:
    """The model card's `mergekit-yaml` line: what mergekit gives from this recipe."""
    why = why_not_portable(recipe)
    if why is not None:
        return f"# not this model: {why}"
    if exact(recipe):
        return "# the same tensors"
    return (
        f"# the same model up to magnitude ties and random masks ({recipe.merge_method} sparsifies; "
        "`evomerge merge` gives the scored bytes)"
    )


__all__ = ["MERGEKIT_METHODS", "exact", "mergekit_line", "portable", "portable_text", "why_not_portable"]
