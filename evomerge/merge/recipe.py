"""A merge recipe: mergekit YAML (the `models:` or the `slices:` form) plus an `evomerge:` provenance block.

    recipe = Recipe.load("recipe.yaml")          # relative model paths resolve against the file's folder
    recipe.dump("out/recipe.yaml")               # `mergekit-yaml out/recipe.yaml OUT` accepts it
    recipe.as_models_form()                      # a `slices:` recipe that is a plain per-layer merge, as `models:`

The same YAML means the same thing here and in mergekit: parameters are mergekit's `ParameterSetting`
(a scalar, a gradient list interpolated across layers, or `{filter, value}` conditionals), and
per-model parameters take precedence over a slice's, which take precedence over global ones.

`slices:` (mergekit's `OutputSliceDefinition`): each slice merges `layer_range: [a, b]` of each of its sources
into b - a consecutive output layers, with gradients interpolated across the slice; embeddings come from the
first slice's sources and the final norm and head from the last slice's. The same full range in every source
is a per-layer merge; different ranges (or `passthrough`) stack layers into a model of another depth.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError, describe_validation

ScalarParameter = bool | int | float | str
EVOMERGE_ONLY = (
    "# evomerge-only: per-row coefficients in the file evomerge.coefficients names; reproduce it with\n"
    "# `evomerge merge` (mergekit-yaml ignores the file and merges another model)\n"
)
EVOMERGE_METHOD = (
    "# evomerge-only: merge_method {method} is evomerge's own (mergekit has no such method: mergekit-yaml\n"
    "# refuses this recipe); reproduce it with `evomerge merge`\n"
)
ScalarOrGradient = ScalarParameter | list[ScalarParameter]


class ConditionalParameter(BaseModel, frozen=True):
    """`{filter: "self_attn", value: 0.3}`: applies to tensors whose name contains `filter` (None or "*": all)."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


# Same shape as mergekit.config.ParameterSetting (kept here so loading a recipe does not import mergekit).
ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient


class ModelEntry(BaseModel, frozen=True):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParameterSetting] | None = None


class SliceSource(BaseModel, frozen=True):
    """`{model, layer_range: [a, b], parameters}`: layers a..b-1 of `model` (mergekit's `InputSliceDefinition`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None


class SliceEntry(BaseModel, frozen=True):
    """One output slice: its sources merged layer by layer (mergekit's `OutputSliceDefinition`)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] | None = None
    residual_weight: float | None = None  # mergekit 0.1.5 reads it and never uses it; so does evomerge

    @property
    def length(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclass(frozen=True)
class MergeGroup:
    """Inputs merged together under one parameter scope: the whole `models:` list, or one slice.

    `inputs` in merge order (the `models:` form appends base_model when it is not listed, as mergekit does;
    a slice merges exactly its sources); `fields[model]` is the recipe field of its entry, for messages."""

    where: str
    inputs: tuple[str, ...]
    own: Mapping[str, Mapping[str, Any] | None]
    fields: Mapping[str, str]
    parameters: Mapping[str, Any] | None
    base_model: str | None
    layer_ranges: Mapping[str, tuple[int, int]] | None = None


class TokenSource(BaseModel, frozen=True):
    """A token's row taken from one model's row of another token (`{kind: model_token, model, token_id | token}`)
    or zero (`{kind: zero}`): mergekit's `ModelTokenEmbedding` and `ZeroEmbedding`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token", "zero"]
    model: str | None = None
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> TokenSource:
        if self.kind == "model_token" and (self.model is None or (self.token_id is None) == (self.token is None)):
            raise ConfigError("a model_token source names its model and exactly one of token_id and token")
        return self


class TokenSetting(BaseModel, frozen=True):
    """`tokens: {TOKEN: {source, force}}`: where the output's row of TOKEN comes from when a model lacks it (every
    model's row with `force: true`): a model folder (its own row of TOKEN) or a TokenSource."""

    model_config = ConfigDict(extra="forbid")
    source: TokenSource | str | None = None
    force: bool = False


class TokenizerBlock(BaseModel, frozen=True):
    """mergekit's `tokenizer:` block: `source` (as `tokenizer_source`, default union), per-token rows (`tokens`) and
    the output's rows padded up to a multiple (`pad_to_multiple_of`)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class CoefficientFile(BaseModel, frozen=True):
    """`evomerge.coefficients`: a safetensors file of per-row task-vector coefficients (evomerge/merge/
    coefficients.py), relative to the recipe's folder, and its sha256: the recipe is evomerge-only."""

    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Provenance(BaseModel, frozen=True):
    """The `evomerge:` block: where a recipe came from, so its checkpoint can be reproduced and verified.

    `inputs` maps each input model folder to the sha256 of its weights; `outputs` maps each file export
    wrote next to the recipe (weights, index, config, tokenizer) to its sha256, for `evomerge verify`.
    `kernels` names the kernel set the weights were merged with (`evomerge.merge.kernels`). `coefficients`
    names a row-coefficient file: mergekit cannot read it (`Recipe.evomerge_only`).
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
    coefficients: CoefficientFile | None = None

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
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Literal["union", "base"] | str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    evomerge: Provenance | None = None

    @model_validator(mode="after")
    def _check_method(self) -> Recipe:
        from evomerge.merge.methods import check_recipe

        if bool(self.models) == bool(self.slices):
            raise ConfigError(
                "a recipe lists its inputs under exactly one of `models:` and `slices:` (mergekit's two forms)"
            )
        for i, piece in enumerate(self.slices or []):
            _check_slice(i, piece)
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ConfigError(
                "fields tokenizer and tokenizer_source: give one (mergekit refuses both); tokenizer.source is the same "
                "setting as tokenizer_source"
            )
        if self.chat_template is not None:
            from evomerge.io.tokenizers import chat_template_text

            chat_template_text(self.chat_template)  # a name mergekit knows, "auto", or a Jinja template
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
        if "modules" in data:
            raise ConfigError(
                f"{source}: field 'modules' (mergekit's per-module form, for multi-module models) is not "
                "supported; write the recipe with 'models:' or 'slices:'"
            )
        data = _without_unread_parameters(data, source)
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
            data["evomerge"] = self.evomerge.model_dump(
                mode="json", exclude_none=True, exclude=None if outputs else {"outputs"}
            )
        return data

    def to_yaml(self, outputs: bool = True) -> str:
        text = yaml.dump(self.to_dict(outputs), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        if self.own_method:
            text = EVOMERGE_METHOD.format(method=self.merge_method) + text
        return (EVOMERGE_ONLY + text) if self.evomerge_only else text

    def dump(self, path: str | os.PathLike) -> None:
        from evomerge.io.atomic import write_file_atomic

        write_file_atomic(path, self.to_yaml())

    # ---- queries -------------------------------------------------------------------------------
    def input_models(self) -> list[str]:
        """Every model the recipe reads, once: `models` as listed (or the slices' sources in order of appearance, then
        each slice's own base_model), then base_model if not among them (mergekit's order in the `models:` form)."""
        if self.slices is None:
            names = [entry.model for entry in self.models or []]
        else:
            names = list(
                dict.fromkeys(
                    [s.model for piece in self.slices for s in piece.sources]
                    + [piece.base_model for piece in self.slices if piece.base_model is not None]
                )
            )
        if self.base_model is not None and self.base_model not in names:
            names.append(self.base_model)
        return names

    def groups(self) -> list[MergeGroup]:
        """The merge groups: one for the `models:` form, one per slice."""
        if self.slices is None:
            fields = {entry.model: f"models[{i}]" for i, entry in enumerate(self.models or [])}
            own = {entry.model: entry.parameters for entry in self.models or []}
            return [MergeGroup("models", tuple(self.input_models()), own, fields, None, self.base_model)]
        out = []
        for i, piece in enumerate(self.slices):
            models = tuple(s.model for s in piece.sources)
            fields = {s.model: f"slices[{i}].sources[{j}]" for j, s in enumerate(piece.sources)}
            own = {s.model: s.parameters for s in piece.sources}
            ranges = {s.model: s.layer_range for s in piece.sources}
            base = piece.base_model if piece.base_model is not None else self.base_model
            out.append(MergeGroup(f"slices[{i}]", models, own, fields, piece.parameters, base, ranges))
        return out

    def as_models_form(self, num_layers: Mapping[str, int]) -> Recipe | None:
        """This recipe in the `models:` form where that merges exactly the same tensors (a `models:` recipe itself;
        a single slice taking every layer of every source, with the base among them or absent, its parameters
        foldable into the global ones); else None. `num_layers[model]`: each input's layer count."""
        if self.slices is None:
            return self
        if len(self.slices) != 1:
            return None
        piece = self.slices[0]
        if any(s.layer_range != (0, num_layers.get(s.model, -1)) for s in piece.sources):
            return None
        base = piece.base_model if piece.base_model is not None else self.base_model
        if base is not None and base not in [s.model for s in piece.sources]:
            return None  # the models form would add the base as an input; the slice does not
        shared = dict(self.parameters or {})
        if piece.parameters and set(piece.parameters) & set(shared):
            return None  # slice parameters fall through to global ones filter by filter: no single global setting
        shared.update(piece.parameters or {})
        models = [ModelEntry(model=s.model, parameters=s.parameters) for s in piece.sources]
        return self.model_copy(
            update={"models": models, "slices": None, "base_model": base, "parameters": shared or None}
        )

    def map_models(self, fn) -> Recipe:
        """The recipe with every model path (entries, sources, base models) replaced by `fn(path)`."""
        update: dict[str, Any] = {"base_model": fn(self.base_model) if self.base_model is not None else None}
        if self.models is not None:
            update["models"] = [e.model_copy(update={"model": fn(e.model)}) for e in self.models]
        if self.slices is not None:
            update["slices"] = [
                piece.model_copy(
                    update={
                        "sources": [s.model_copy(update={"model": fn(s.model)}) for s in piece.sources],
                        "base_model": fn(piece.base_model) if piece.base_model is not None else None,
                    }
                )
                for piece in self.slices
            ]
        return self.model_copy(update=update)

    def with_provenance(self, **fields: Any) -> Recipe:
        current = self.evomerge or Provenance()
        return self.model_copy(update={"evomerge": current.model_copy(update=fields)})

    def field_of(self, model: str) -> str:
        """The recipe field that names `model`: `models[i].model`, `slices[i].sources[j].model` or `base_model`."""
        for group in self.groups():
            if model in group.fields:
                return f"{group.fields[model]}.model"
        for i, piece in enumerate(self.slices or []):
            if piece.base_model == model:
                return f"slices[{i}].base_model"
        return "base_model"

    @property
    def vocab_source(self) -> str | None:
        """The output vocabulary's source: `tokenizer_source`, else the `tokenizer:` block's `source`, else None (the
        inputs share one vocabulary)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def evomerge_only(self) -> bool:
        """Whether only `evomerge merge` reproduces this recipe (it names a coefficient file mergekit ignores)."""
        return self.evomerge is not None and self.evomerge.coefficients is not None

    @property
    def own_method(self) -> bool:
        """Whether the method is evomerge's own (merge/registry.py's `evomerge_only`: mergekit has no such method),
        so only `evomerge merge` reproduces this recipe, with or without a coefficient file."""
        from evomerge.merge.registry import REGISTRY

        info = REGISTRY.get(self.merge_method)
        return info is not None and info.evomerge_only

    @property
    def seed(self) -> int:
        return self.evomerge.seed if self.evomerge is not None else 0

    @property
    def kernels(self) -> str:
        """The kernel set this recipe is merged with: the one it records, else `EVOMERGE_KERNELS`, else evomerge-1."""
        from evomerge.merge.kernels import default_kernels

        recorded = self.evomerge.kernels if self.evomerge is not None else None
        return recorded or default_kernels()


def _check_slice(i: int, piece: SliceEntry) -> None:
    """A slice's layer ranges: non-empty, ascending, the same length in every source (mergekit's rule)."""
    seen = set()
    for j, src in enumerate(piece.sources):
        a, b = src.layer_range
        if a < 0 or b <= a:
            raise ConfigError(
                f"field slices[{i}].sources[{j}].layer_range: [{a}, {b}] is empty or negative; "
                "write [first, last + 1] with first >= 0"
            )
        if src.model in seen:
            raise ConfigError(
                f"field slices[{i}].sources[{j}].model: {src.model} is listed twice in one slice; "
                "put its other layer range in a slice of its own"
            )
        seen.add(src.model)
    lengths = [s.layer_range[1] - s.layer_range[0] for s in piece.sources]
    if len(set(lengths)) > 1:
        j = next(k for k, n in enumerate(lengths) if n != lengths[0])
        raise ConfigError(
            f"field slices[{i}].sources[{j}].layer_range: {list(piece.sources[j].layer_range)} spans {lengths[j]} "
            "layers "
            f"but sources[0] spans {lengths[0]}; every source of a slice spans the same number of layers"
        )


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Model paths as written, made absolute against the recipe's folder (offline: every model is a folder)."""

    from evomerge.io.inputs import resolve_ref

    def fix(value: Any) -> Any:  # each half of mergekit's `BASE+ADAPTER` resolved on its own
        return resolve_ref(value, base_dir) if isinstance(value, str) else value

    data = dict(data)
    if data.get("base_model") is not None:
        data["base_model"] = fix(data["base_model"])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**entry, "model": fix(entry["model"])} if isinstance(entry, dict) and "model" in entry else entry
            for entry in data["models"]
        ]
    if isinstance(data.get("slices"), list):
        data["slices"] = [_resolve_slice(piece, fix) for piece in data["slices"]]
    if data.get("tokenizer_source") not in (None, "base", "union"):
        data["tokenizer_source"] = fix(data["tokenizer_source"])
    if isinstance(data.get("tokenizer"), dict):
        data["tokenizer"] = _resolve_tokenizer_block(data["tokenizer"], fix)
    block = data.get("evomerge")
    if isinstance(block, dict) and isinstance(block.get("inputs"), dict):
        block = data["evomerge"] = {**block, "inputs": {fix(k): v for k, v in block["inputs"].items()}}
    if isinstance(block, dict) and isinstance(block.get("coefficients"), dict):
        coefficients = block["coefficients"]
        if isinstance(coefficients.get("file"), str):
            data["evomerge"] = {**block, "coefficients": {**coefficients, "file": fix(coefficients["file"])}}
    return data


def _resolve_tokenizer_block(block: dict, fix) -> dict:
    """The `tokenizer:` block's model folders (its source, each token's source model) made absolute."""
    block = dict(block)
    if block.get("source") not in (None, "base", "union"):
        block["source"] = fix(block["source"])
    if isinstance(block.get("tokens"), dict):
        tokens = {}
        for token, setting in block["tokens"].items():
            if isinstance(setting, dict) and isinstance(setting.get("source"), str):
                setting = {**setting, "source": fix(setting["source"])}
            elif isinstance(setting, dict) and isinstance(setting.get("source"), dict):
                ref = setting["source"]
                if isinstance(ref.get("model"), str):
                    setting = {**setting, "source": {**ref, "model": fix(ref["model"])}}
            tokens[token] = setting
        block["tokens"] = tokens
    return block


def _without_unread_parameters(data: dict, source: str) -> dict:
    """`data` less the parameters its method does not read but another method does (mergekit ignores them: recipes
    copied between model cards carry `weight` under slerp, `t` under linear), with one RecipeWarning per name. A
    name no method has stays, so that validation refuses it (a typo: "did you mean")."""
    import warnings

    from evomerge.errors import RecipeWarning
    from evomerge.merge.registry import REGISTRY

    info = REGISTRY.get(data.get("merge_method")) if isinstance(data.get("merge_method"), str) else None
    if info is None:
        return data
    known = {name for m in REGISTRY.values() for name in m.params}
    unread: dict[str, list[str]] = {}

    def strip(params: Any, where: str) -> Any:
        if not isinstance(params, dict):
            return params
        for name in params:
            if name not in info.params and name in known:
                unread.setdefault(name, []).append(f"{where}.{name}")
        kept = {k: v for k, v in params.items() if k in info.params or k not in known}
        return kept or None

    data = dict(data)
    if "parameters" in data:
        data["parameters"] = strip(data["parameters"], "parameters")
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**e, "parameters": strip(e["parameters"], f"models[{i}].parameters")}
            if isinstance(e, dict) and "parameters" in e
            else e
            for i, e in enumerate(data["models"])
        ]
    if isinstance(data.get("slices"), list):
        data["slices"] = [_strip_slice(piece, i, strip) for i, piece in enumerate(data["slices"])]
    for name, fields in unread.items():
        more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
        warnings.warn(
            RecipeWarning(
                f"{source}: field {fields[0]}{more}: {info.name} does not read {name!r}; ignored, as mergekit "
                "ignores it"
            ),
            stacklevel=3,
        )
    return data


def _strip_slice(piece: Any, i: int, strip) -> Any:
    if not isinstance(piece, dict):
        return piece
    piece = dict(piece)
    if "parameters" in piece:
        piece["parameters"] = strip(piece["parameters"], f"slices[{i}].parameters")
    if isinstance(piece.get("sources"), list):
        piece["sources"] = [
            {**src, "parameters": strip(src["parameters"], f"slices[{i}].sources[{j}].parameters")}
            if isinstance(src, dict) and "parameters" in src
            else src
            for j, src in enumerate(piece["sources"])
        ]
    return piece


def _resolve_slice(piece: Any, fix) -> Any:
    if not isinstance(piece, dict):
        return piece
    piece = dict(piece)
    if piece.get("base_model") is not None:
        piece["base_model"] = fix(piece["base_model"])
    if isinstance(piece.get("sources"), list):
        piece["sources"] = [
            {**src, "model": fix(src["model"])} if isinstance(src, dict) and "model" in src else src
            for src in piece["sources"]
        ]
    return piece


class _Dumper(yaml.SafeDumper):
    """Gradients (lists of numbers) in flow style, like mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
