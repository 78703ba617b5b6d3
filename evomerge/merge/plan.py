"""Plan a merge as mergekit's planner does: which output tensors, from which input tensors, with which parameters.

    plan = Plan(recipe, layout)          # layout: the reference checkpoint's tensor names (merge.layout)
    for job in plan.jobs(): ...          # one Job per output tensor, parameters resolved

Precedence: a model's own parameters, then its slice's, then the global ones (mergekit's
`ConfigReader.parameter_sources`). Gradients interpolate with t = i / (n - 1) across the n layers of a slice
(the `models:` form is one slice over every layer; t = 1 when it has a single layer); tensors outside the
layers get t = 0 (mergekit's pre/post weights), the embeddings from the first slice's sources and the final
norm and head from the last slice's. Filters match when the filter string occurs in the tensor name; per-model
parameters see each input's own tensor name (its own layer index in a slice), shared ones the output's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.layout import Layout, after_layers, layer_index, with_layer
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Recipe

__all__ = ["Job", "Plan", "TensorParams", "layer_t"]


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters of one output tensor: shared values and one dict per input model."""

    name: str
    t: float
    shared: dict[str, Any]
    per_input: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Job:
    """One output tensor: its name, the input models merged into it (merge order), the tensor each contributes,
    the merge's base model and the resolved parameters."""

    name: str
    inputs: tuple[str, ...]
    sources: tuple[str, ...]
    base_model: str | None
    params: TensorParams


def layer_t(name: str, num_layers: int | None) -> float:
    index = layer_index(name)
    if index is None:
        return 0.0
    if not num_layers or num_layers <= 1:
        return 1.0
    return index / (num_layers - 1)


class Plan:
    """A recipe bound to mergekit's method and parameter types; `resolve(name)` and `jobs()` are cheap and pure.

    `layout` gives the reference checkpoint's tensor names (base_model, else the first input); `num_layers`
    alone is enough for `resolve` on the `models:` form (search spaces read recipes that way)."""

    def __init__(
        self,
        recipe: Recipe,
        num_layers: int | None = None,
        *,
        layout: Layout | None = None,
        layers_of: Mapping[str, int] | None = None,
    ):
        """`layers_of[model]`: each input's layer count, to check the slices' layer ranges against."""
        from mergekit.config import ParameterSetting
        from pydantic import TypeAdapter

        self.recipe = recipe
        self.method = get_method(recipe.merge_method)
        self.inputs = recipe.input_models()
        self.layout = layout
        self.num_layers = num_layers if num_layers is not None else (layout.num_layers if layout else None)
        adapter = TypeAdapter(dict[str, ParameterSetting])

        def convert(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
            if params is None:
                return None
            plain = {k: _plain(v) for k, v in params.items()}
            return adapter.validate_python(plain)

        self._global = convert(recipe.parameters)
        self.groups = recipe.groups()
        self._own = [{m: convert(p) for m, p in g.own.items()} for g in self.groups]
        self._group_params = [convert(g.parameters) for g in self.groups]
        for g in self.groups:
            for model, (a, b) in (g.layer_ranges or {}).items():
                depth = (layers_of or {}).get(model)
                if depth is not None and b > depth:
                    raise ConfigError(
                        f"field {g.fields[model]}.layer_range: [{a}, {b}] reaches past the {depth} layers "
                        f"of {model}; end it at {depth} or less"
                    )

    @property
    def out_layers(self) -> int | None:
        """Decoder layers of the merged model: the slices' lengths summed, or the reference's own."""
        if self.recipe.slices is None:
            return self.num_layers
        return sum(piece.length for piece in self.recipe.slices)

    def layer_origins(self) -> list[tuple[str, int]]:
        """For each output layer of a `slices:` recipe, (model, layer) of its first source (config per layer)."""
        return [
            (p.sources[0].model, p.sources[0].layer_range[0] + i)
            for p in self.recipe.slices or []
            for i in range(p.length)
        ]

    def _settings(self, g: int):
        def sources(model: str | None) -> Iterable[Mapping[str, Any] | None]:
            if model is not None:
                yield self._own[g].get(model)
            yield self._group_params[g]
            yield self._global

        return sources

    def _resolve(self, g: int, name: str, sources: tuple[str, ...], t: float) -> TensorParams:
        from mergekit.parameter_resolver import resolve_parameters

        group = self.groups[g]
        try:
            shared, per_input = resolve_parameters(
                self.method.spec,
                tensor_name=name,
                inputs=dict(zip(group.inputs, sources)),
                sources=self._settings(g),
                base_model=group.base_model,
                t=t,
            )
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"tensor {name}: {exc}; add a parameter that covers it (a filter-less fallback)"
            ) from None
        return TensorParams(name=name, t=t, shared=shared, per_input=per_input)

    def resolve(self, name: str, t: float | None = None) -> TensorParams:
        """The parameters of tensor `name` in a `models:` recipe; `t` (its layer position, 0-1) defaults to where the
        name puts it."""
        if self.recipe.slices is not None:
            raise ValueError("resolve() reads the models: form; use jobs() for slices")
        t = layer_t(name, self.num_layers) if t is None else t
        return self._resolve(0, name, (name,) * len(self.groups[0].inputs), t)

    def jobs(self) -> Iterator[Job]:
        """Every output tensor in the layout's name order (slices: embeddings, the slices' layers, then the rest)."""
        if self.layout is None:
            raise ValueError("jobs() needs the layout of the reference checkpoint")
        names = self.layout.merged_names()
        if self.recipe.slices is None:
            group = self.groups[0]
            for name in names:
                sources = (name,) * len(group.inputs)
                yield Job(name, group.inputs, sources, group.base_model, self.resolve(name))
            return
        outside = [n for n in names if layer_index(n) is None]
        yield from self._outside(0, [n for n in outside if not after_layers(n)])
        out_index = 0
        for g, piece in enumerate(self.recipe.slices):
            group = self.groups[g]
            for i in range(piece.length):
                t = i / (piece.length - 1) if piece.length > 1 else 1.0
                first = piece.sources[0].layer_range[0] + i
                for template in self._templates(first):
                    name = with_layer(template, out_index)
                    sources = tuple(with_layer(template, s.layer_range[0] + i) for s in piece.sources)
                    yield Job(name, group.inputs, sources, group.base_model, self._resolve(g, name, sources, t))
                out_index += 1
        yield from self._outside(len(self.groups) - 1, [n for n in outside if after_layers(n)])

    def _outside(self, g: int, names: list[str]) -> Iterator[Job]:
        group = self.groups[g]
        for name in names:
            sources = (name,) * len(group.inputs)
            yield Job(name, group.inputs, sources, group.base_model, self._resolve(g, name, sources, 0.0))

    def _templates(self, layer: int) -> list[str]:
        """The reference's tensor names of one layer (of layer 0 where the reference is shallower)."""
        names = [n for n in self.layout.layer_names(layer) if n not in self.layout.tied]  # type: ignore[union-attr]
        names = names or [n for n in self.layout.layer_names(0) if n not in self.layout.tied]  # type: ignore[union-attr]
        if not names:
            raise ModelError(
                f"{self.layout.architecture}: no tensor names with a layer index; "  # type: ignore[union-attr]
                "a slices: recipe needs numbered decoder layers (model.layers.N...)"
            )
        return names


def _plain(value: Any) -> Any:
    """Our pydantic settings as plain data, for mergekit's own ParameterSetting types."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
