"""Search spaces: which merge parameters are searched, per which layer groups, within which bounds.

A space is YAML (`search_spaces/<name>.yaml`, a path, or a mapping inline in the search config):

    methods: [ties]            # merge methods this space is for
    layers_per_group: 2        # one value per 2 layers; 0 = one value for all layers
    control_points: null       # K: K values interpolated across the layers instead (smooth)
    kinds: [self_attn, mlp]    # separate values per tensor kind; other tensors (norms) get `default`
    embeddings: true           # embed_tokens and lm_head get their own value
    parameters:
      weight:  {low: 0.0, high: 1.0, default: 0.5}   # searched; `default` is the baseline trial's value
      density: {low: 0.1, high: 1.0, default: 0.5}
      normalize: {value: true}                        # fixed
      lambda:  {low: 0.5, high: 1.5, default: 1.0, per_layer: false}

`SearchSpace.to_recipe` turns one point (Optuna params) into a `Recipe`: per-layer groups become mergekit
gradient lists (length L with a value repeated per group, or length K for control points), kinds become
filter conditionals. `SearchSpace.from_recipe` is its inverse, so any recipe can be enqueued as a trial.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import ConfigError, ModelError, close_matches

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
PER_MODEL = frozenset({"weight", "density", "gamma", "epsilon"})  # one value per merged model
EMBED_FILTERS = ("embed_tokens", "lm_head")


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


# what mergekit accepts for the bounded parameters: (low test, high test, the interval in words)
_RANGES = {
    "density": (lambda x: x > 0, lambda x: x <= 1, "(0, 1]"),
    "t": (lambda x: x >= 0, lambda x: x <= 1, "[0, 1]"),
    "epsilon": (lambda x: x >= 0, lambda x: x < 1, "[0, 1)"),
    "gamma": (lambda x: x >= 0, lambda x: x < 1, "[0, 1)"),
}


class SpaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "inline"
    description: str = ""
    methods: list[str] = Field(min_length=1)
    layers_per_group: int = Field(0, ge=0)
    control_points: int | None = Field(None, ge=2)
    kinds: list[str] = []
    embeddings: bool = False
    base_in_models: bool = Field(False, description="list base_model among the models (slerp)")
    max_models: int | None = Field(None, ge=1)
    parameters: dict[str, ParamSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _in_range(self) -> SpaceSpec:
        for name, spec in self.parameters.items():
            if name not in _RANGES:
                continue
            lo, hi, text = _RANGES[name]
            ends = [spec.value] if not spec.searched else [spec.low, spec.high]
            ends = [x for x in ends if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if not all(lo(x) and hi(x) for x in ends):
                raise ValueError(f"parameters.{name}: {ends} leaves {text}; keep {name} within {text}")
        return self


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
        from evomerge.search.config import format_errors

        raise ConfigError(format_errors(where, err).replace("unknown key", "unknown search-space key")) from None


def num_layers(model_dir: Path | str) -> int:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read the model config ({err}); point base_model at an HF model folder")
    n = cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{path}: no `num_hidden_layers`; evomerge searches per-layer parameters of decoder models")
    return n


DEFAULTS_LABEL = "defaults"  # the baseline label of the enqueued default merge (the guard always validates it)


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


def _conditionals(setting: Any) -> list | None:
    def is_cond(x: Any) -> bool:
        return (isinstance(x, dict) and "value" in x) or hasattr(x, "filter")

    if is_cond(setting):
        return [setting]
    if isinstance(setting, list) and setting and all(is_cond(x) for x in setting):
        return setting
    return None


def resolve_setting(setting: Any, tensor: str, t: float) -> Any:
    """A mergekit ParameterSetting's value for one tensor at layer position t (first matching filter wins)."""
    conds = _conditionals(setting)
    if conds is not None:
        for c in conds:
            flt = c.get("filter") if isinstance(c, dict) else c.filter
            if flt is None or flt in tensor:
                return resolve_setting(c["value"] if isinstance(c, dict) else c.value, tensor, t)
        return None
    if isinstance(setting, (list, tuple)):
        if len(setting) == 1:
            return setting[0]
        scaled = t * (len(setting) - 1)
        if abs(scaled - round(scaled)) < 1e-9:
            scaled = round(scaled)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return setting[i0] * (1 - frac) + setting[i1] * frac
    return setting


class SearchSpace:
    """A `SpaceSpec` laid over a model with `num_layers` layers."""

    def __init__(self, spec: SpaceSpec, num_layers: int):
        self.spec = spec
        self.num_layers = num_layers

    @classmethod
    def load(cls, ref: str | dict | Path, base_model: Path | str) -> SearchSpace:
        return cls(load_space_spec(ref), num_layers(base_model))

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
            for key in keys if param in PER_MODEL else [None]:
                if not ps.per_layer:
                    out.append(Slot(param, key, None, None))
                    continue
                if self.spec.embeddings:
                    out.append(Slot(param, key, "embed", None))
                groups = [None] if self.n_groups == 1 else list(range(self.n_groups))
                for kind in self.spec.kinds or [None]:
                    out += [Slot(param, key, kind, g) for g in groups]
        return out

    def distributions(self, models: list) -> dict[str, Any]:
        from optuna.distributions import FloatDistribution

        out = {}
        for s in self.slots(models):
            ps = self.spec.parameters[s.param]
            out[s.name] = FloatDistribution(ps.low, ps.high, log=ps.log)
        return out

    # -- points -----------------------------------------------------------------------------------
    def defaults(self, models: list) -> dict[str, float]:
        return {s.name: float(self.spec.parameters[s.param].baseline) for s in self.slots(models)}

    def baselines(self, models: list) -> list[tuple[str, dict[str, float]]]:
        """(label, params): the method's defaults, then each source model alone where the space allows."""
        out = [(DEFAULTS_LABEL, self.defaults(models))]
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
                out.append((f"only {key}", point))
        if "t" in params and params["t"].searched:
            for label, end in (("only base", "low"), (f"only {model_keys(models)[-1]}", "high")):
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
            conds += [{"filter": f, "value": e} for f in EMBED_FILTERS]
        if self.spec.kinds:
            conds += [{"filter": k, "value": layered(k)} for k in self.spec.kinds]
            conds.append({"value": ps.baseline})
        else:
            conds.append({"value": layered(None)})
        return conds[0]["value"] if len(conds) == 1 else conds

    def to_recipe(self, params: dict[str, float], models: list, base: Path | str, method: str, seed: int, dtype: str | None = None,
                  kernels: str | None = None):
        """The Recipe of one point: `models` are the merged models (not the base), in config order; `kernels`
        (the kernel set it is merged with) goes into its provenance."""
        from evomerge.recipe import Recipe

        missing = [s.name for s in self.slots(models) if s.name not in params]
        if missing:
            raise ConfigError(f"search space {self.spec.name!r}: point lacks {', '.join(missing[:3])}; pass every searched parameter")
        values = {k: float(v) for k, v in params.items()}
        keys = model_keys(models)
        entries = [{"model": str(base)}] if self.spec.base_in_models else []
        for key, path in zip(keys, models):
            per_model = {p: self._setting(p, key, values) for p in self.spec.parameters if p in PER_MODEL}
            entries.append({"model": str(path), **({"parameters": per_model} if per_model else {})})
        shared = {p: self._setting(p, None, values) for p in self.spec.parameters if p not in PER_MODEL}
        data: dict[str, Any] = {"merge_method": method, "base_model": str(base), "models": entries}
        if shared:
            data["parameters"] = shared
        if dtype:
            data["dtype"] = dtype
        data["evomerge"] = {"seed": int(seed), **({"kernels": kernels} if kernels else {})}
        return Recipe.model_validate(data)

    def from_recipe(self, recipe) -> dict[str, float]:
        """The point of a recipe (values read at each group's first layer, clipped to the bounds)."""
        base = str(recipe.base_model)
        entries = [e for e in recipe.models if str(e.model) != base]
        keys = model_keys([e.model for e in entries])
        by_key = {k: (e.parameters or {}) for k, e in zip(keys, entries)}
        shared = recipe.parameters or {}
        out = {}
        for s in self.slots([e.model for e in entries]):
            ps = self.spec.parameters[s.param]
            setting = by_key.get(s.model, {}).get(s.param) if s.model else None
            if setting is None:
                setting = shared.get(s.param)
            if s.kind == "embed":
                tensor, t = "model.embed_tokens.weight", 0.0
            else:
                g = s.group or 0
                t = self._group_t(g) if s.group is not None else 0.0
                layer = round(t * (self.num_layers - 1))
                tensor = f"model.layers.{layer}.{s.kind or 'mlp.down_proj'}.weight"
            value = resolve_setting(setting, tensor, t) if setting is not None else None
            out[s.name] = ps.clip(ps.baseline if value is None else value)
        return out


__all__ = ["SearchSpace", "SpaceSpec", "ParamSpec", "Slot", "load_space_spec", "model_keys", "num_layers"]
