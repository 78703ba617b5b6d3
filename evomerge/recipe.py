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
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.errors import ConfigError, describe_validation

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
    """

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    version: str | None = None
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    study: str | None = None
    trial: int | None = None
    scores: dict[str, float] = {}
    extra: dict[str, Any] = {}


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
            raise ConfigError(f"{source}: {describe_validation(exc, Recipe, quote=False)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    # ---- writing -------------------------------------------------------------------------------
    def to_dict(self, outputs: bool = True) -> dict:
        """`outputs=False`: without `evomerge.outputs` (what a model card, itself an output, can embed)."""
        data = self.model_dump(mode="json", exclude_none=True, exclude={"evomerge"})
        if self.evomerge is not None:
            data["evomerge"] = self.evomerge.model_dump(mode="json", exclude_none=True, exclude=None if outputs else {"outputs"})
        return data

    def to_yaml(self, outputs: bool = True) -> str:
        return yaml.dump(self.to_dict(outputs), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

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


class _Dumper(yaml.SafeDumper):
    """Gradients (lists of numbers) in flow style, like mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
