"""Search spaces: which merge parameters are searched, per which layer groups, within which bounds.

A space is YAML (`search_spaces/<name>.yaml`, a path, or a mapping inline in the search config):

    methods: [ties]            # merge methods this space is for
    layers_per_group: 2        # one value per 2 layers; 0 = one value for all layers
    control_points: null       # K: K values interpolated across the layers instead (smooth)
    kinds: [self_attn, mlp]    # separate values per tensor kind; the tensors no kind names (norms) get a searched
                               # `rest` value per model, one across the layers
    embeddings: true           # the embeddings and the head get their own value
    parameters:
      weight:  {low: 0.0, high: 1.0, default: 0.5}   # searched; `default` is the baseline trial's value
      density: {low: 0.1, high: 1.0, default: 0.5}
      normalize: {value: true}                        # fixed
      lambda:  {low: 0.5, high: 1.5, default: 1.0, per_layer: false}

`SearchSpace.to_recipe` turns one point (a trial's params) into a `Recipe`: per-layer groups become mergekit
gradient lists (length L with a value repeated per group, or length K for control points), kinds become
filter conditionals. A space is laid over the base model's architecture (`SearchSpace.over`): each kind
becomes the filter that names it there (`self_attn` is `attn` on GPT-2 and `.attention.` on GPT-NeoX,
`merge.layout`), `embeddings` the names of the embeddings and head it stores, and a kind that names no
tensor of the architecture is refused. `SearchSpace.from_recipe` is its inverse (read through mergekit's own
parameter resolver, `merge.plan`), so any recipe can be enqueued as a trial. `bounds` are plain numbers;
`study.study` turns them into Optuna distributions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.candidate.baseline import BaselineLabel
from evomerge.errors import ConfigError, ModelError, close_matches, describe_validation
from evomerge.io.checkpoint import config_num_layers
from evomerge.merge.registry import REGISTRY, interval
from evomerge.resources import SEARCH_SPACES

if TYPE_CHECKING:
    from evomerge.config.schema import SearchConfig
    from evomerge.merge.layout import Layout
    from evomerge.merge.recipe import Recipe

SPACES_DIR = SEARCH_SPACES  # the shipped spaces, inside the installed package
PROJECTIONS = "projections"  # `kinds: [projections]`: every weight matrix of a layer apart (Layout.projections)
LLAMA_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)  # where a space is not laid over a model
REST = "rest"  # with `kinds`: the tensors no kind matches (norms), one value per model across the layers
EMBED_FILTERS = ("embed_tokens", "lm_head")  # Llama-style names, where a space is not laid over a model
SIGNIFICANT = 4  # digits a recipe keeps of each searched number


class ParamSpec(BaseModel):
    """A parameter: searched within [low, high], or fixed to `value`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float | None = None
    high: float | None = None
    default: float | None = None
    value: float | bool | str | None = None
    log: bool = False
    per_layer: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.value is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either `value` (fixed) or `low` and `high` (searched), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a searched parameter needs `low` and `high` (or a fixed `value`)")
        if not self.low < self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if self.default is not None and not self.low <= self.default <= self.high:
            raise ValueError(f"`default` {self.default} lies outside [{self.low}, {self.high}]")
        return self

    @property
    def searched(self) -> bool:
        return self.value is None

    @property
    def baseline(self) -> Any:
        """The parameter's value in the default-merge baseline (and for tensors no kind matches)."""
        if not self.searched:
            return self.value
        return self.default if self.default is not None else (self.low + self.high) / 2

    def clip(self, x: float) -> float:
        return min(max(float(x), self.low), self.high)


class SpaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "inline"
    description: str = ""
    methods: list[str] = Field(min_length=1)
    layers_per_group: int | Literal["auto"] = Field(
        0, description="layers per group; 0: one value across the layers; auto: sized to the model (see resolve)"
    )
    control_points: int | None = Field(None, ge=2)
    kinds: list[str] = []
    embeddings: bool = False
    base_in_models: bool = Field(False, description="list base_model among the models (slerp)")
    max_models: int | None = Field(
        None, ge=1, description="models merged into base_model at most; its methods' limit (merge/registry.py) if unset"
    )
    parameters: dict[str, ParamSpec] = Field(min_length=1)

    @field_validator("layers_per_group")
    @classmethod
    def _lpg(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value}: use 0 (one value across the layers), a positive count, or auto")
        return value

    @model_validator(mode="after")
    def _in_range(self) -> SpaceSpec:
        """The bounded parameters stay where a recipe may put them (their methods' intervals, merge/registry.py)."""
        for name, spec in self.parameters.items():
            bounds = interval(self.methods, name)
            if bounds is None:
                continue
            ends = [spec.value] if not spec.searched else [spec.low, spec.high]
            ends = [x for x in ends if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if not all(x in bounds for x in ends):
                raise ValueError(f"parameters.{name}: {ends} leaves {bounds}; keep {name} within {bounds}")
        return self

    def per_model(self, param: str) -> bool:
        """Whether `param` takes one value per merged model (mergekit's per-input scope, merge/registry.py) in this
        space's methods: DELLA's `epsilon` does, RAM's does not."""
        for method in self.methods:
            info = REGISTRY.get(method)
            if info is not None and param in info.params:
                return info.params[param].per_model
        return param in ("weight", "density", "gamma", "epsilon")  # a method evomerge does not know: by name

    @property
    def endpoints(self) -> bool:
        """Whether its `t` runs from base_model (0) to the other model (1), so both ends are baselines (slerp)."""
        return all(REGISTRY[m].endpoints for m in self.methods if m in REGISTRY)

    @model_validator(mode="before")
    @classmethod
    def _method_limit(cls, data: Any) -> Any:
        """`max_models` from the methods' own limit (slerp: 1, merge/registry.py) where the space sets none."""
        if not isinstance(data, dict) or data.get("max_models") is not None:
            return data
        methods = data.get("methods") if isinstance(data.get("methods"), list) else []
        limits = [REGISTRY[m].max_models for m in methods if isinstance(m, str) and m in REGISTRY]
        limits = [n for n in limits if n is not None]
        return {**data, "max_models": min(limits)} if limits else data


def _available() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space_spec(ref: str | dict | Path, source: str = "search_space") -> SpaceSpec:
    """A space by name (`search_spaces/<name>.yaml`), by path, or from an inline mapping."""
    if isinstance(ref, dict):
        data, where = ref, source
    else:
        path = Path(ref)
        if not path.is_file():
            path = SPACES_DIR / f"{ref}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"{source}: no search space {str(ref)!r}{close_matches(str(ref), _available())}; "
                f"use a name from search_spaces/ ({', '.join(_available())}), a path, or a mapping"
            )
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict):
            data = {"name": path.stem, **data}
        where = str(path)
    try:
        return SpaceSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {describe_validation(err, SpaceSpec)}") from None


def num_layers(model_dir: Path | str) -> int:
    """The base model's decoder-layer count, from its config.json (the search space is laid over it)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(
            f"{path}: cannot read the model config ({err}); point base_model at an HF model folder"
        ) from None
    n = config_num_layers(cfg) if isinstance(cfg, dict) else None
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{path}: no `num_hidden_layers`; evomerge searches per-layer parameters of decoder models")
    return n


def model_keys(models: list) -> list[str]:
    """Short unique names for models (their folder names), used in parameter names."""
    keys: list[str] = []
    for i, m in enumerate(models):
        key = re.sub(r"[^A-Za-z0-9_-]", "_", Path(str(m)).name) or f"m{i}"
        keys.append(key if key not in keys else f"{key}_{i}")
    return keys


@dataclass(frozen=True)
class Slot:
    """One searched number: a parameter, of one model (or global), of one tensor kind, in one layer group."""

    param: str
    model: str | None
    kind: str | None  # a filter substring, "embed", or None for every tensor
    group: int | None  # layer group or control point; None: one value across layers

    @property
    def name(self) -> str:
        label = None if self.group is None else f"g{self.group}"
        return ".".join(p for p in (self.param, self.model, self.kind, label) if p is not None)


AUTO_PER_LAYER = 8  # `layers_per_group: auto`: one group per layer up to this many layers, control points above


def resolve(spec: SpaceSpec, num_layers: int) -> SpaceSpec:
    """`layers_per_group: auto` made concrete for a model: one group per layer when it has few layers (every layer
    its own values: few enough numbers for a short search, and the gradient refinement moves each one), else a
    smooth curve of one control point per 4 layers (4 to 8 points) interpolated across the layers, so a deep
    model's search stays as small as a shallow one's."""
    if spec.layers_per_group != "auto":
        return spec
    if spec.control_points or num_layers <= AUTO_PER_LAYER:
        return spec.model_copy(update={"layers_per_group": 0 if spec.control_points else 1})
    return spec.model_copy(update={"layers_per_group": 0, "control_points": min(8, max(4, math.ceil(num_layers / 4)))})


class SearchSpace:
    """A `SpaceSpec` laid over a model with `num_layers` layers (and, given its `layout`, over its tensor names:
    `over` builds both from a model folder)."""

    def __init__(self, spec: SpaceSpec, num_layers: int, layout: Layout | None = None):
        if list(spec.kinds) == [PROJECTIONS]:
            kinds = layout.projections() if layout is not None else list(LLAMA_PROJECTIONS)
            spec = spec.model_copy(update={"kinds": kinds})
        self.spec = resolve(spec, num_layers)
        self.num_layers = num_layers
        self.layout = layout
        self.filters = {k: k for k in spec.kinds}  # kind -> the filter that names it in this architecture
        self.embed_filters = list(EMBED_FILTERS)
        if layout is not None:
            self.filters, self.embed_filters = _lay_over(spec, layout)

    @classmethod
    def over(cls, spec: SpaceSpec, model_dir: Path | str) -> SearchSpace:
        """`spec` laid over the model in `model_dir` (its config.json and safetensors headers; no weights read)."""
        from evomerge.io.checkpoint import Checkpoint
        from evomerge.merge.layout import Layout

        return cls(spec, num_layers(model_dir), Layout.of(Checkpoint(model_dir)))

    # -- layout -----------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        if self.spec.control_points:
            return self.spec.control_points
        lpg = self.spec.layers_per_group
        return math.ceil(self.num_layers / lpg) if lpg else 1

    def _group_t(self, g: int) -> float:
        """Layer position (0..1) a group's value is read at: its first layer, or its control point."""
        if self.spec.control_points:
            return g / (self.spec.control_points - 1)
        first = g * self.spec.layers_per_group
        return first / (self.num_layers - 1) if self.num_layers > 1 else 0.0

    def slots(self, models: list) -> list[Slot]:
        out = []
        keys = model_keys(models)
        for param, ps in self.spec.parameters.items():
            if not ps.searched:
                continue
            for key in keys if self.spec.per_model(param) else [None]:
                if not ps.per_layer:
                    out.append(Slot(param, key, None, None))
                    continue
                if self.spec.embeddings:
                    out.append(Slot(param, key, "embed", None))
                groups = [None] if self.n_groups == 1 else list(range(self.n_groups))
                for kind in self.spec.kinds or [None]:
                    out += [Slot(param, key, kind, g) for g in groups]
                if self.spec.kinds:
                    out.append(Slot(param, key, REST, None))
        return out

    def bounds(self, models: list) -> dict[str, ParamSpec]:
        """{searched number's name: its ParamSpec (`low`, `high`, `log`)}, in slot order."""
        return {s.name: self.spec.parameters[s.param] for s in self.slots(models)}

    # -- points -----------------------------------------------------------------------------------
    def defaults(self, models: list) -> dict[str, float]:
        return {s.name: float(self.spec.parameters[s.param].baseline) for s in self.slots(models)}

    def baselines(self, models: list) -> list[tuple[BaselineLabel, dict[str, float]]]:
        """(label, params): the method's defaults, then each source model alone where the space allows."""
        out = [(BaselineLabel.defaults(), self.defaults(models))]
        params = self.spec.parameters
        if "weight" in params and params["weight"].searched:
            for key in model_keys(models):
                point = self.defaults(models)
                for s in self.slots(models):
                    ps = params[s.param]
                    if s.param == "weight":
                        point[s.name] = ps.clip(1.0 if s.model == key else 0.0)
                    elif s.param == "density":
                        point[s.name] = ps.high
                    elif s.param == "rank_fraction":  # TSV-M: all of this model's directions, none of the others'
                        point[s.name] = ps.high if s.model == key else ps.low
                out.append((BaselineLabel.alone(key), point))
        if "t" in params and params["t"].searched and self.spec.endpoints:
            ends = [(BaselineLabel.alone("base"), "low"), (BaselineLabel.alone(model_keys(models)[-1]), "high")]
            for label, end in ends:
                point = self.defaults(models)
                for s in self.slots(models):
                    if s.param == "t":
                        point[s.name] = getattr(params["t"], end)
                out.append((label, point))
        return out

    def _setting(self, param: str, model: str | None, values: dict[str, float]) -> Any:
        ps = self.spec.parameters[param]
        if not ps.searched:
            return ps.value
        if not ps.per_layer:
            return values[Slot(param, model, None, None).name]

        def layered(kind: str | None) -> Any:
            if self.n_groups == 1:
                return values[Slot(param, model, kind, None).name]
            groups = [values[Slot(param, model, kind, g).name] for g in range(self.n_groups)]
            if len(set(groups)) == 1:  # a flat curve reads better (and evaluates exactly) as a scalar
                return groups[0]
            if self.spec.control_points:
                return groups
            lpg = self.spec.layers_per_group
            return [groups[layer // lpg] for layer in range(self.num_layers)]

        conds: list[dict] = []
        if self.spec.embeddings:
            e = values[Slot(param, model, "embed", None).name]
            conds += [{"filter": f, "value": e} for f in self.embed_filters]
        if self.spec.kinds:
            conds += [{"filter": self.filters[k], "value": layered(k)} for k in self.spec.kinds]
            conds.append({"value": values[Slot(param, model, REST, None).name]})
        else:
            conds.append({"value": layered(None)})
        if all(c["value"] == conds[0]["value"] for c in conds):  # one value everywhere reads (and merges) as a scalar
            return conds[0]["value"]
        return conds

    def to_recipe(
        self,
        params: dict[str, float],
        models: list,
        base: Path | str,
        method: str,
        seed: int,
        dtype: str | None = None,
        kernels: str | None = None,
        *,
        rounded: bool = True,
    ):
        """The Recipe of one point: `models` are the merged models (not the base), in config order; `kernels`
        (the kernel set it is merged with) goes into its provenance. `rounded`: values at 4 significant digits
        (every recipe a search scores; the gradient refinement reads exact ones)."""
        from evomerge.merge.recipe import Recipe

        missing = [s.name for s in self.slots(models) if s.name not in params]
        if missing:
            raise ConfigError(
                f"search space {self.spec.name!r}: point lacks {', '.join(missing[:3])}; pass every searched parameter"
            )
        # 4 significant digits: far finer than any score can tell apart, and the recipe that is scored, exported
        # and shown stays readable (the sampler's own unrounded value stays in the study)
        values = {k: float(f"{float(v):.{SIGNIFICANT}g}") if rounded else float(v) for k, v in params.items()}
        keys = model_keys(models)
        entries = [{"model": str(base)}] if self.spec.base_in_models else []
        for key, path in zip(keys, models):
            per_model = {p: self._setting(p, key, values) for p in self.spec.parameters if self.spec.per_model(p)}
            entries.append({"model": str(path), **({"parameters": per_model} if per_model else {})})
        shared = {p: self._setting(p, None, values) for p in self.spec.parameters if not self.spec.per_model(p)}
        data: dict[str, Any] = {"merge_method": method, "base_model": str(base), "models": entries}
        if shared:
            data["parameters"] = shared
        if dtype:
            data["dtype"] = dtype
        data["evomerge"] = {"seed": int(seed), **({"kernels": kernels} if kernels else {})}
        return Recipe.model_validate(data)

    def from_recipe(self, recipe: Recipe) -> dict[str, float]:
        """The point of a recipe: each searched number read where its group starts (a layer group's first layer,
        or a control point's position), as mergekit's resolver reads the recipe there, clipped to the bounds; a
        parameter the recipe does not set takes its baseline."""
        from evomerge.merge.plan import Plan

        recipe = self._models_form(recipe)
        base = str(recipe.base_model)
        entries = [e for e in recipe.models if str(e.model) != base]
        keys = model_keys([e.model for e in entries])
        path_of = {k: e.model for k, e in zip(keys, entries)}
        given = {p for params in [recipe.parameters, *(e.parameters for e in recipe.models)] for p in (params or {})}
        plan = Plan(recipe, num_layers=self.num_layers)
        out = {}
        for s in self.slots([e.model for e in entries]):
            ps = self.spec.parameters[s.param]
            if s.kind == "embed":
                tensor, t = self._embed_tensor(), 0.0
            elif s.kind == REST:
                tensor, t = self._rest_tensor(), 0.0
            else:
                t = self._group_t(s.group) if s.group is not None else 0.0
                layer = round(t * (self.num_layers - 1))
                tensor = self._layer_tensor(layer, s.kind)
            value = None
            if s.param in given:
                resolved = plan.resolve(tensor, t=t)
                value = resolved.per_input[path_of[s.model]][s.param] if s.model else resolved.shared[s.param]
            out[s.name] = ps.clip(ps.baseline if value is None else value)
        return out

    def _rest_tensor(self) -> str:
        """A tensor no kind names (a norm), where a `rest` value is read back."""
        if self.layout is None:
            return "model.norm.weight"
        named = [*self.filters.values(), *self.embed_filters]
        return next((n for n in self.layout.merged_names() if not any(f in n for f in named)), "model.norm.weight")

    def _embed_tensor(self) -> str:
        if self.layout is None:
            return "model.embed_tokens.weight"
        return next(n for n in self.layout.merged_names() if self.embed_filters[0] in n)

    def _layer_tensor(self, layer: int, kind: str | None) -> str:
        """A tensor of `layer` (of `kind`, else an MLP one) where a recipe's parameters are read for a slot."""
        if self.layout is None:
            return f"model.layers.{layer}.{kind or 'mlp.down_proj'}.weight"
        return self.layout.example(layer, self.filters[kind] if kind else None)

    def _models_form(self, recipe: Recipe) -> Recipe:
        """A `slices:` recipe that is a plain per-layer merge, in the `models:` form (a space reads only that)."""
        if recipe.slices is None:
            return recipe
        depths = {m: num_layers(m) for m in recipe.input_models()}
        plain = recipe.as_models_form(depths)
        if plain is None:
            raise ConfigError(
                "this slices: recipe is not one per-layer merge (several slices, partial layer ranges, parameters "
                "per slice that overlap the global ones, or base_model outside the sources); a search starts only "
                "from a recipe the models: form writes exactly"
            )
        return plain


def _lay_over(spec: SpaceSpec, layout: Layout) -> tuple[dict[str, str], list[str]]:
    """(kind -> its filter in `layout`'s architecture, the embedding filters), or ConfigError naming what matches
    no tensor of the architecture."""
    filters = {}
    for kind in spec.kinds:
        found = layout.kind_filter(kind)
        if found is None:
            raise ConfigError(
                f"search space {spec.name!r}: kinds entry {kind!r} matches no tensor of {layout.architecture} (its "
                "layer "
                f"tensors: {layout.describe()}); use self_attn, mlp or a part of those names"
            )
        filters[kind] = found
    embed = layout.embedding_filters()
    if spec.embeddings and not embed:
        raise ConfigError(
            f"search space {spec.name!r}: embeddings: true, but {layout.architecture} stores no embedding or head "
            "tensor "
            "evomerge recognizes (embed_tokens, wte, embed_in, lm_head, ...); set embeddings: false"
        )
    return filters, embed


def space_of(cfg: SearchConfig) -> SearchSpace:
    """The search space of a loaded config: its resolved `search_space` laid over the base model's architecture, after
    checking that the models can merge with it (shape-defining config.json fields, unless `allow_config_mismatch`;
    tensor names, shapes and tokenizer where this process can read the weights), so a search fails here rather than
    in its workers. Where it cannot (a driver without the weights), the names come from the architecture's config."""
    from evomerge.io.checkpoint import check_compatible, config_mismatch
    from evomerge.io.inputs import open_inputs
    from evomerge.merge.layout import Layout

    spec = SpaceSpec.model_validate(cfg.search_space)
    refs = [str(cfg.base_model), *map(str, cfg.models)]
    configs = [(Path(ref), _read_config(_config_folder(ref, cfg.base_model))) for ref in refs]
    vocab = cfg.tokenizer_source is None
    for other in configs[1:]:
        why = None if cfg.allow_config_mismatch else config_mismatch(configs[0], other, vocab=vocab)
        if why is not None:
            raise ModelError(why)
    try:
        opened = open_inputs(refs, str(cfg.base_model))
    except ModelError:  # no readable weights here: the workers, which load them, say why
        layout = Layout.from_config(configs[0][0])
    else:
        checkpoints = [opened[ref] for ref in refs]
        check_compatible(checkpoints, allow_config_mismatch=cfg.allow_config_mismatch, vocab_may_differ=not vocab)
        layout = Layout.of(checkpoints[0])
    try:
        return SearchSpace(spec, num_layers(cfg.base_model), layout)
    except ConfigError as err:
        raise ConfigError(f"{cfg._source}: {err}") from None


def _config_folder(ref: str, base_model: Path) -> Path:
    """The folder whose config.json describes a model reference (a LoRA adapter's: its base's)."""
    from evomerge.io.inputs import split_ref
    from evomerge.io.lora import is_adapter

    model, _ = split_ref(ref)
    return Path(base_model) if is_adapter(model) else Path(model)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(
            f"{path}: cannot read the model config ({err}); point base_model and models at HF model folders"
        ) from None
    return data if isinstance(data, dict) else {}


__all__ = [
    "REST",
    "ParamSpec",
    "SearchSpace",
    "Slot",
    "SpaceSpec",
    "load_space_spec",
    "model_keys",
    "num_layers",
    "space_of",
]
