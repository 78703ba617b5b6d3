"""Row coefficients: an evomerge-only recipe scales each model's task vector row by row before its method merges.

    coefficients = RowCoefficients.load(path, sha256)           # a safetensors file, checked against its hash
    tensors = coefficients.scale(name, tensors, inputs, base)   # one tensor's inputs, each model's rows scaled

A recipe may name a coefficient file in its provenance block (`evomerge: {coefficients: {file, sha256}}`; the file
beside `recipe.yaml`, its sha256 recorded). For each tensor the file covers, model `models[i]`'s tensor becomes

    base + m[:, None] * (model_i - base)            m: the file's `models.<i>.<tensor name>`, one value per row

and the recipe's method then merges as usual: for task arithmetic, base + lambda * sum_i w_i * (m_i row-scaled
task vector i), a weight per output row where mergekit's YAML has one per tensor. mergekit cannot read the file:
such a recipe is evomerge-only (`Recipe.evomerge_only`; `evomerge merge` reproduces it byte for byte, mergekit-yaml
merges it as if every coefficient were 1). A file whose bytes differ from the recorded sha256 is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

FILE_NAME = "coefficients.safetensors"  # the name export gives the file beside recipe.yaml
PREFIX = "models"


def key(model_index: int, tensor: str) -> str:
    """The file's key of model `models[model_index]`'s row coefficients in `tensor`."""
    return f"{PREFIX}.{model_index}.{tensor}"


def parse_key(name: str) -> tuple[int, str]:
    prefix, index, tensor = name.split(".", 2)
    if prefix != PREFIX or not index.isdigit():
        raise ValueError(name)
    return int(index), tensor


def write_coefficients(path: Path | str, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write {key: 1-D float32 tensor} atomically to `path`; returns the file's sha256."""
    import torch
    from safetensors.torch import save

    from evomerge.io.atomic import write_file_atomic

    data = save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(tensors.items())})
    write_file_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


class RowCoefficients:
    """A coefficient file's multipliers, keyed (model index, tensor name)."""

    def __init__(self, values: Mapping[tuple[int, str], torch.Tensor]):
        self.values = dict(values)

    @classmethod
    def load(cls, path: Path | str, sha256: str, source: str = "recipe") -> RowCoefficients:
        """The file at `path`, refused (ConfigError naming the field) when missing or not the recorded bytes."""
        from safetensors.torch import load

        path = Path(path)
        field = f"{source}: field evomerge.coefficients"
        if not path.is_file():
            raise ConfigError(f"{field}.file: {path} does not exist; put the coefficient file beside the recipe")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ConfigError(
                f"{field}.sha256: {path} has sha256 {digest[:16]}..., not the recorded {sha256[:16]}...; the file "
                "was changed or replaced: restore the file the recipe was written with"
            )
        values = {}
        for name, tensor in load(data).items():
            try:
                values[parse_key(name)] = tensor
            except ValueError:
                raise ConfigError(f"{field}.file: {path} has key {name!r}; keys are models.<i>.<tensor>") from None
        return cls(values)

    def covers(self, tensor: str) -> bool:
        return any(name == tensor for _, name in self.values)

    def check(self, n_models: int, shapes: Mapping[str, Sequence[int]], source: str = "recipe") -> None:
        """ConfigError unless every key names a model of the recipe and a tensor with that many rows."""
        for (i, name), value in self.values.items():
            if i >= n_models:
                raise ConfigError(f"{source}: coefficient file names models[{i}]; the recipe has {n_models} models")
            shape = shapes.get(name)
            if shape is None or not shape or value.shape != (shape[0],):
                raise ConfigError(
                    f"{source}: coefficients of models[{i}] in {name} have shape {tuple(value.shape)}; "
                    f"the tensor has shape {tuple(shape) if shape else 'none'} (one coefficient per row)"
                )

    def scale(
        self, name: str, tensors: list[torch.Tensor], models: Sequence[str], inputs: Sequence[str], base: str
    ) -> list[torch.Tensor]:
        """`tensors` (aligned with `inputs`) with each covered model's task vector rows scaled; `models`: the
        recipe's `models:` entries in order (what the file's indices count)."""
        if not self.covers(name):
            return tensors
        b = tensors[inputs.index(base)]
        out = list(tensors)
        for i, model in enumerate(models):
            m = self.values.get((i, name))
            if m is None or model == base or model not in inputs:
                continue
            j = inputs.index(model)
            row = m.to(device=b.device, dtype=b.dtype).view(-1, *([1] * (b.dim() - 1)))
            out[j] = b + row * (tensors[j] - b)
        return out


__all__ = ["FILE_NAME", "RowCoefficients", "key", "parse_key", "write_coefficients"]
