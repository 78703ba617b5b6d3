"""Expand a recipe to per-tensor parameters, exactly as mergekit's planner does for the `models:` form.

Precedence: a model's own parameters, then the global ones (mergekit's `ConfigReader.parameter_sources`).
Gradients interpolate with t = layer / (num_layers - 1) for tensors inside a decoder layer
(t = 1 when there is a single layer); embeddings, final norm and lm_head get t = 0 (mergekit's
pre/post weights). Filters match when the filter string occurs in the tensor name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from evomerge.errors import ConfigError
from evomerge.merge.methods import get_method
from evomerge.recipe import Recipe

# `model.layers.3.`, `transformer.h.3.`, `blocks.3.`, `encoder.layer.3.`: the decoder-layer index
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters of one output tensor: shared values and one dict per input model."""

    name: str
    t: float
    shared: dict[str, Any]
    per_input: dict[str, dict[str, Any]]


def layer_index(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def layer_t(name: str, num_layers: int | None) -> float:
    index = layer_index(name)
    if index is None:
        return 0.0
    if not num_layers or num_layers <= 1:
        return 1.0
    return index / (num_layers - 1)


class Plan:
    """A recipe bound to mergekit's method and parameter types; `resolve(name)` is cheap and pure."""

    def __init__(self, recipe: Recipe, num_layers: int | None):
        from pydantic import TypeAdapter

        from mergekit.config import ParameterSetting

        self.recipe = recipe
        self.method = get_method(recipe.merge_method)
        self.inputs = recipe.input_models()
        self.num_layers = num_layers
        adapter = TypeAdapter(dict[str, ParameterSetting])

        def convert(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
            if params is None:
                return None
            plain = {k: _plain(v) for k, v in params.items()}
            return adapter.validate_python(plain)

        self._global = convert(recipe.parameters)
        self._own = {entry.model: convert(entry.parameters) for entry in recipe.models}

    def _sources(self, model: str | None) -> Iterable[Mapping[str, Any] | None]:
        if model is not None:
            yield self._own.get(model)
        yield self._global

    def resolve(self, name: str, t: float | None = None) -> TensorParams:
        """The parameters of tensor `name`; `t` (its layer position, 0-1) defaults to where the name puts it."""
        from mergekit.parameter_resolver import resolve_parameters

        t = layer_t(name, self.num_layers) if t is None else t
        try:
            shared, per_input = resolve_parameters(
                self.method.spec,
                tensor_name=name,
                inputs={model: name for model in self.inputs},
                sources=self._sources,
                base_model=self.recipe.base_model,
                t=t,
            )
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"tensor {name}: {exc}; add a parameter that covers it (a filter-less fallback)") from None
        return TensorParams(name=name, t=t, shared=shared, per_input=per_input)


def _plain(value: Any) -> Any:
    """Our pydantic settings as plain data, for mergekit's own ParameterSetting types."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
