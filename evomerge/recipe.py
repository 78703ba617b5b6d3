"""A merge recipe: mergekit YAML (the `models:` form) plus an `evomerge:` provenance block.

    recipe = Recipe.load("recipe.yaml")          # relative model paths resolve against the file's folder
    recipe.dump("out/recipe.yaml")               # `mergekit-yaml out/recipe.yaml OUT` accepts it

The same YAML means the same thing here and in mergekit: parameters are mergekit's `ParameterSetting`
(a scalar, a gradient list interpolated across layers, or `{filter, value}` conditionals), and
per-model parameters take precedence over global ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError, close_matches

ScalarParameter = Union[bool, int, float, str]
ScalarOrGradient = Union[ScalarParameter, list[ScalarParameter]]


class ConditionalParameter(BaseModel, frozen=True):
    """`{filter: "self_attn", value: 0.3}`: applies to tensors whose name contains `filter` (None or "*": all)."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


# Same shape as mergekit.config.ParameterSetting (kept here so loading a recipe does not import mergekit).
ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]


class ModelEntry(BaseModel, frozen=True):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParameterSetting] | None = None


class Provenance(BaseModel, frozen=True):
    """The `evomerge:` block: where a recipe came from, so its checkpoint can be reproduced and verified.

    `inputs` maps each input model folder to the sha256 of its weights; `outputs` maps each file export
    wrote next to the recipe (weights, index, config, tokenizer) to its sha256, for `evomerge verify`.
    `kernels` names the kernel set the weights were merged with (`evomerge.merge.kernels`).
    """

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    version: str | None = None
    kernels: str | None = None
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    study: str | None = None
    trial: int | None = None
    scores: dict[str, float] = {}
    extra: dict[str, Any] = {}

    @field_validator("kernels")
    @classmethod
    def _known_kernels(cls, value: str | None) -> str | None:
        from evomerge.merge.kernels import canonical_kernels

        if value is None:
            return None
        try:
            return canonical_kernels(value)
        except ValueError as exc:
            raise ConfigError(f"field evomerge.kernels: {exc}") from None


class Recipe(BaseModel, frozen=True):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Union[Literal["union", "base"], str, None] = None
    chat_template: str | None = None
    evomerge: Provenance | None = None

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        from evomerge.merge.methods import check_recipe

        check_recipe(self)
        return self

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe file not found; check the path") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read recipe ({exc.strerror})") from None
        return cls.from_yaml(text, source=str(path), base_dir=path.resolve().parent)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>", base_dir: Path | None = None) -> Recipe:
        from evomerge.io.yamlfile import parse_yaml

        data = parse_yaml(text, source)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a recipe is a YAML mapping with merge_method and models")
        return cls.from_dict(data, source=source, base_dir=base_dir)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "<dict>", base_dir: Path | None = None) -> Recipe:
        for key in ("slices", "modules"):
            if key in data:
                raise ConfigError(f"{source}: field {key!r} is not supported; write the recipe with 'models:'")
        if "tokenizer" in data:
            raise ConfigError(f"{source}: field 'tokenizer' is not supported; use 'tokenizer_source: base' or a model path")
        if base_dir is not None:
            data = _resolve_paths(data, Path(base_dir))
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_describe(exc)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    # ---- writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = self.model_dump(mode="json", exclude_none=True, exclude={"evomerge"})
        if self.evomerge is not None:
            data["evomerge"] = self.evomerge.model_dump(mode="json", exclude_none=True)
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def dump(self, path: str | os.PathLike) -> None:
        from evomerge.io.atomic import write_file_atomic

        write_file_atomic(path, self.to_yaml())

    # ---- queries -------------------------------------------------------------------------------
    def input_models(self) -> list[str]:
        """Merge inputs in mergekit's order: `models` as listed, then base_model if not among them."""
        names = [entry.model for entry in self.models]
        if self.base_model is not None and self.base_model not in names:
            names.append(self.base_model)
        return names

    def with_provenance(self, **fields: Any) -> Recipe:
        current = self.evomerge or Provenance()
        return self.model_copy(update={"evomerge": current.model_copy(update=fields)})

    def field_of(self, model: str) -> str:
        """The recipe field that names `model`: `models[i].model` or `base_model`, for error messages."""
        for i, entry in enumerate(self.models):
            if entry.model == model:
                return f"models[{i}].model"
        return "base_model"

    @property
    def seed(self) -> int:
        return self.evomerge.seed if self.evomerge is not None else 0

    @property
    def kernels(self) -> str:
        """The kernel set this recipe is merged with: the one it records, else `EVOMERGE_KERNELS`, else evomerge-1."""
        from evomerge.merge.kernels import default_kernels

        recorded = self.evomerge.kernels if self.evomerge is not None else None
        return recorded or default_kernels()


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Model paths as written, made absolute against the recipe's folder (offline: every model is a folder)."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value) and not value.startswith("~"):
            return os.path.normpath(base_dir / value)
        if isinstance(value, str) and value.startswith("~"):
            return os.path.expanduser(value)
        return value

    data = dict(data)
    if data.get("base_model") is not None:
        data["base_model"] = fix(data["base_model"])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**entry, "model": fix(entry["model"])} if isinstance(entry, dict) and "model" in entry else entry
            for entry in data["models"]
        ]
    if data.get("tokenizer_source") not in (None, "base", "union"):
        data["tokenizer_source"] = fix(data["tokenizer_source"])
    block = data.get("evomerge")
    if isinstance(block, dict) and isinstance(block.get("inputs"), dict):
        data["evomerge"] = {**block, "inputs": {fix(k): v for k, v in block["inputs"].items()}}
    return data


def _describe(exc: ValidationError) -> str:
    """Every pydantic error on one line: `field a.b: message; field c: message`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field{close_matches(str(err['loc'][-1]), _fields_at(err['loc'])) or '; remove it'}"
        elif err["type"] == "missing":
            msg = "required; add it"
        parts.append(f"field {loc}: {msg}" if loc else msg)
    # union members produce one error each; keep the first per location
    seen: dict[str, str] = {}
    for part in parts:
        seen.setdefault(part.split(":")[0], part)
    return "; ".join(seen.values())


def _fields_at(loc: tuple) -> list[str]:
    """The field names valid where an unknown key `loc` was found (for "did you mean")."""
    if len(loc) == 1:
        model: type[BaseModel] = Recipe
    elif loc[0] == "models" and len(loc) == 3:
        model = ModelEntry
    elif loc[0] == "evomerge" and len(loc) == 2:
        model = Provenance
    else:  # a `{filter, value}` conditional parameter
        model = ConditionalParameter
    return list(model.model_fields)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"bool", "int", "float", "str", "ConditionalParameter"})


class _Dumper(yaml.SafeDumper):
    """Gradients (lists of numbers) in flow style, like mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
