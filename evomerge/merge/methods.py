"""The merge methods evomerge runs (mergekit 0.1.5's, by name, and evomerge's own), and recipe checks against them."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, close_matches
from evomerge.merge.registry import REGISTRY, interval

if TYPE_CHECKING:
    from mergekit.merge_methods import MergeMethod

    from evomerge.merge.recipe import MergeGroup, Recipe

METHODS = tuple(REGISTRY)  # every method evomerge runs (merge/registry.py), in registry order
DTYPES = ("float32", "float16", "bfloat16", "float64")


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ConfigError(
            f"field merge_method: unknown method {name!r}{close_matches(name, METHODS)}; valid: {', '.join(METHODS)}"
        )
    if REGISTRY[name].evomerge_only:
        return _evomerge_method(name)
    from mergekit import merge_methods

    return merge_methods.get(name)


@functools.cache
def _evomerge_method(name: str) -> MergeMethod:
    """An evomerge-only method (merge/registry.py's `evomerge_only`) as a mergekit MergeMethod built from its entry:
    the same parameter binding and input checks as mergekit's own, the kernel `merge/kernels/subspace.py`. It is
    not registered with mergekit (mergekit-yaml refuses it)."""
    from mergekit.merge_methods.base import (
        MISSING,
        BasePolicy,
        FunctionalGroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
        ParameterSpec,
    )

    from evomerge.merge.kernels.subspace import merge_group

    info = REGISTRY[name]
    specs = tuple(
        ParameterSpec(
            pname,
            float,
            ParameterScope.NON_BASE if p.per_model else ParameterScope.SHARED,
            default=MISSING if p.required else p.default,
        )
        for pname, p in info.params.items()
    )
    spec = MergeMethodSpec(name, specs, InputContract(base=BasePolicy.REQUIRED, min_non_base=1), pretty_name=info.paper)

    def implementation(group, **params):
        return merge_group(name, group, params["weight"], params)

    return FunctionalGroupMergeMethod(spec, implementation)


def check_recipe(recipe: Recipe) -> None:
    """Every semantic check mergekit would only hit mid-merge (or never): raise ConfigError naming the field."""
    method = get_method(recipe.merge_method)
    specs = {p.name: p for p in method.spec.parameters}
    scopes = [("parameters", recipe.parameters)]
    for group in recipe.groups():
        if group.parameters is not None:
            scopes.append((f"{group.where}.parameters", group.parameters))
        scopes += [(f"{group.fields[m]}.parameters", params) for m, params in group.own.items()]
    for where, params in scopes:
        for name, setting in (params or {}).items():
            if name not in specs:
                valid = ", ".join(specs) or "none"
                raise ConfigError(
                    f"field {where}.{name}: {recipe.merge_method} has no parameter "
                    f"{name!r}{close_matches(name, specs)}; valid: {valid}"
                )
            for leaf in _leaves(setting):
                _check_value(recipe.merge_method, specs[name], leaf, f"{where}.{name}")
    for field in ("dtype", "out_dtype"):
        value = getattr(recipe, field)
        if value is not None and value not in DTYPES:
            raise ConfigError(f"field {field}: {value!r} is not a dtype; use one of {', '.join(DTYPES)}")
    for group in recipe.groups():
        inputs = list(group.inputs)
        if len(set(inputs)) != len(inputs):
            raise ConfigError(f"field {group.where}: a model is listed twice")
        try:
            method.validate_inputs(inputs, group.base_model)
        except ValueError as exc:
            if group.base_model is None and "requires a base" in str(exc):
                raise ConfigError(
                    f"field base_model: {recipe.merge_method} needs a base model (the one the others were fine-tuned "
                    "from); add `base_model: PATH`"
                ) from None
            hint = "; list base_model among each slice's sources" if recipe.slices is not None else ""
            raise ConfigError(
                f"field {group.where}: {recipe.merge_method}: {exc}; check base_model and the models listed{hint}"
            ) from None
        _check_required(recipe, group, method)
        _check_della(recipe, group)


def _leaves(setting: Any) -> Iterator[Any]:
    """Every scalar a setting can evaluate to (gradients interpolate between leaves, so ranges hold)."""
    from pydantic import BaseModel

    if isinstance(setting, BaseModel):  # a `{filter, value}` ConditionalParameter (recipe.py imports this module)
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


def _check_value(method: str, spec: Any, value: Any, where: str) -> None:
    from pydantic import ValidationError

    try:
        value = spec.validate(value)
    except ValidationError:
        raise ConfigError(f"field {where}: {value!r} is not a valid {spec.name}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"field {where}: {spec.name} must be finite, got {value!r}")
    bounds = interval([method], spec.name)
    if bounds is not None and value not in bounds:
        raise ConfigError(f"field {where}: {spec.name} must be in {bounds}, got {value!r}")


def _check_required(recipe: Recipe, group: MergeGroup, method: MergeMethod) -> None:
    from mergekit.merge_methods.base import ParameterScope

    global_params = {**(recipe.parameters or {}), **(group.parameters or {})}
    for spec in method.spec.parameters:
        if not spec.required or spec.name in global_params:
            continue
        if spec.scope == ParameterScope.SHARED:
            raise ConfigError(f"field parameters.{spec.name}: {recipe.merge_method} requires it")
        for model in group.inputs:
            if spec.scope == ParameterScope.NON_BASE and model == group.base_model:
                continue
            if spec.name not in (group.own.get(model) or {}):
                raise ConfigError(
                    f"field parameters.{spec.name}: {recipe.merge_method} requires {spec.name} for {model}; "
                    f"set it under that model's parameters or globally"
                )


def _check_della(recipe: Recipe, group: MergeGroup) -> None:
    """DELLA samples keep-probabilities in density +/- epsilon, which must stay inside (0, 1)."""
    params = REGISTRY[recipe.merge_method].params
    if "epsilon" not in params or "density" not in params:
        return
    shared = {**(recipe.parameters or {}), **(group.parameters or {})}
    for model, own in group.own.items():
        if model == group.base_model:
            continue
        given = {**shared, **(own or {})}
        d, e = given.get("density", params["density"].default), given.get("epsilon", params["epsilon"].default)
        # gradients and filters are checked per tensor at merge time (the pairs depend on the layer)
        if isinstance(d, (int, float)) and isinstance(e, (int, float)) and d < 1 and not (0 < d - e and d + e < 1):
            raise ConfigError(
                f"field {group.fields[model]}.parameters: della needs density +/- epsilon inside (0, 1), "
                f"got density {d} and epsilon {e}; lower epsilon"
            )
