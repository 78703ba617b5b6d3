"""PEFT LoRA adapters as merge inputs, kept low rank: the base's mapped tensors plus each adapter's factors.

    lora = LoraCheckpoint(Checkpoint("zoo/base"), "adapters/add")
    lora.get("model.layers.0.self_attn.q_proj.weight")      # W + scale * B @ A, formed when asked (on `device`)
    lora.factors("model.layers.0.self_attn.q_proj.weight")  # (B, A, scale, transposed) or None

A LoraCheckpoint reads like a `Checkpoint` (names, shapes, dtypes, `get`), so merges, exports and audits see one
interface; it holds only the adapter's own tensors (a few MB to a few hundred) and reads every other byte from the
base, which a worker maps once for all its adapters. `get` forms a targeted tensor as PEFT's `merge_and_unload`
does (what mergekit runs for `base+adapter`): delta = B @ A (transposed for `fan_in_fan_out` and for embeddings)
times scale, in float32 when the factors are float16/bfloat16, cast back to the factors' dtype, then added in
place to a copy of the base tensor (so in the base's dtype). scale = lora_alpha / r, or lora_alpha / sqrt(r) with
`use_rslora`; `rank_pattern` and `alpha_pattern` set r and alpha per module (a pattern matches a module whose
name ends with it). Full tensors an adapter stores (`modules_to_save`, an embedding's `base_layer`, trained
biases) replace the base's. What this reader does not support is refused with a line naming the field:
DoRA, `lora_bias`, trainable tokens, layer replication, `target_parameters`, aLoRA, QA-LoRA, Megatron, convolutions,
and adapter types other than LoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ModelError
from evomerge.io.digest import files_sha256

if TYPE_CHECKING:
    import torch

    from evomerge.io.checkpoint import Checkpoint

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# adapter_config.json fields this reader refuses when set (their value when off), and why
UNSUPPORTED = {
    "use_dora": (False, "DoRA (a magnitude vector per weight) is not a low-rank delta"),
    "lora_bias": (False, "lora_bias (a trained bias on B) is not supported"),
    "trainable_token_indices": (None, "trainable tokens are not supported; resize the embeddings and retrain instead"),
    "layer_replication": (None, "layer replication changes the model's depth"),
    "target_parameters": (None, "LoRA on nn.Parameter targets (target_parameters) is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) only applies after its invocation tokens"),
    "use_qalora": (False, "QA-LoRA is not supported"),
    "megatron_config": (None, "Megatron-parallel LoRA layers are not supported"),
}


def is_adapter(folder: str | os.PathLike) -> bool:
    """A PEFT adapter folder: adapter_config.json (and no config.json of a full model beside it)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_nbytes(folder: str | os.PathLike) -> int:
    """The adapter's weight files' size (no weight is read): what the resource plan counts for it."""
    return sum(f.stat().st_size for f in _adapter_files(Path(folder), allow_pickle=True))


def adapter_base(folder: str | os.PathLike) -> str | None:
    """The adapter's `base_model_name_or_path` (a Hub id or a path, as its trainer wrote it), or None."""
    try:
        value = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Factors:
    """One targeted tensor's low-rank delta: scale * B @ A (transposed when `transposed`)."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float
    transposed: bool
    embedding: bool = False


class LoraCheckpoint:
    """A LoRA adapter over a base checkpoint, read like a Checkpoint: `get(name)` is the base tensor plus the
    adapter's delta (or the adapter's own full tensor); nothing but the adapter's tensors is held."""

    def __init__(self, base: Checkpoint, adapter: str | os.PathLike, *, allow_pickle: bool = False):
        self.base = base
        self.path = Path(adapter)
        self.config: dict[str, Any] = base.config  # an adapter keeps its base's architecture and shapes
        self.settings = _read_settings(self.path)
        self.files = _adapter_files(self.path, allow_pickle)
        tensors = _load(self.files)
        self._factors, self._full = _parse(self.path, self.settings, tensors, base)

    # ---- what a merge reads (the Checkpoint interface) ---------------------------------------------
    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The adapted tensor: the adapter's own where it stores one, else the base's, plus the low-rank delta where
        the adapter targets it, formed on `device` (default: where the base tensor is, the CPU)."""
        tensor = self._full[name] if name in self._full else self.base.get(name)
        factors = self._factors.get(name)
        if factors is None:
            return tensor if device is None else tensor.to(device)
        return add_delta(tensor, factors, device)

    def factors(self, name: str) -> Factors | None:
        """The low-rank factors of a targeted tensor (None where the adapter does not target it)."""
        return self._factors.get(name)

    def release(self, name: str) -> None:
        self.base.release(name)

    @property
    def num_layers(self) -> int | None:
        return self.base.num_layers

    @property
    def architecture(self) -> str:
        return self.base.architecture

    @property
    def model_dir(self) -> Path:
        """The folder of this model's config.json and tokenizer: the base's (mergekit reads `base+adapter`'s
        tokenizer there too)."""
        return self.base.path

    def vocab(self) -> dict[str, int] | None:
        return self.base.vocab()

    @cached_property
    def _sha256(self) -> str:
        import hashlib

        adapter = files_sha256([self.path / ADAPTER_CONFIG, *self.files])
        return hashlib.sha256(f"{self.base.sha256()}+{adapter}".encode()).hexdigest()

    def sha256(self) -> str:
        """sha256 of "BASE+ADAPTER": the base's weights' sha256 (`Checkpoint.sha256`, computed once for all its
        adapters) and that of the adapter's config and weights."""
        return self._sha256

    @property
    def nbytes(self) -> int:
        """Bytes this adapter holds in memory (its factors and full tensors)."""
        held = [t for f in self._factors.values() for t in (f.a, f.b)] + list(self._full.values())
        return sum(t.numel() * t.element_size() for t in held)

    def __repr__(self) -> str:
        return f"LoraCheckpoint({str(self.base.path)!r}+{str(self.path)!r})"


def add_delta(tensor: torch.Tensor, factors: Factors, device: torch.device | str | None = None) -> torch.Tensor:
    """`tensor` + scale * B @ A as PEFT merges it (see the module docstring), as a new tensor on `device`."""
    import torch

    a, b, moved = factors.a, factors.b, tensor
    if device is not None:
        a, b, moved = a.to(device), b.to(device), tensor.to(device)
    out = moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved  # never write into the mapped pages
    dtype = a.dtype if factors.embedding else b.dtype  # PEFT's: lora_embedding_A's, lora_B's
    half = dtype in (torch.float16, torch.bfloat16)  # PEFT's CPU rule: multiply half factors in float32
    if half:
        a, b = a.float(), b.float()
    product = b @ a
    if factors.transposed:
        product = product.T
    delta = product * factors.scale
    if half:
        delta = delta.to(dtype)
    out += delta
    return out


def _read_settings(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    if not isinstance(settings, dict):
        raise ModelError(f"{path}: not a JSON object")
    kind = settings.get("peft_type", "LORA")
    if kind != "LORA":
        raise ModelError(f"{path}: peft_type is {kind}; evomerge merges LoRA adapters only (peft_type LORA)")
    for field, (off, why) in UNSUPPORTED.items():
        value = settings.get(field, off)
        if value not in (off, False, None, [], {}):
            raise ModelError(f"{path}: field {field} is set: {why}; merge the adapter into its base first")
    if settings.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ModelError(f"{path}: field bias is {settings['bias']!r}; use none, all or lora_only")
    for field in ("r", "lora_alpha"):
        if not isinstance(settings.get(field, 8), (int, float)) or settings.get(field, 8) <= 0:
            raise ModelError(f"{path}: field {field} must be a positive number, got {settings.get(field)!r}")
    return settings


def _adapter_files(folder: Path, allow_pickle: bool) -> list[Path]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        return [st]
    pickled = folder / "adapter_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise ModelError(
                f"{pickled}: the adapter's weights are a pickle, which can run code when loaded; save it with "
                "safetensors (peft: save_pretrained(..., safe_serialization=True)) or pass --allow-pickle"
            )
        return [pickled]
    raise ModelError(f"{folder}: adapter_config.json but no adapter_model.safetensors; save the adapter with peft")


def _load(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = files[0]
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file}: corrupt safetensors file ({exc}); re-save the adapter") from None
    from evomerge.io.checkpoint import load_pickles

    return load_pickles(files)


def _scale(settings: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r (alpha / sqrt(r) with use_rslora), patterns first."""
    r = _pattern(settings.get("rank_pattern") or {}, module, settings.get("r", 8))
    alpha = _pattern(settings.get("alpha_pattern") or {}, module, settings.get("lora_alpha", 8))
    if r != rank:
        raise ModelError(f"adapter module {module}: its factors have rank {rank} but adapter_config.json says r={r}")
    return alpha / math.sqrt(r) if settings.get("use_rslora") else alpha / r


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule: the first key the module's name ends with (after a dot)
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emb>.+)\.(?P<ekind>lora_embedding_[AB])$")


def _parse(
    folder: Path, settings: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], base: Checkpoint
) -> tuple[dict[str, Factors], dict[str, torch.Tensor]]:
    """The adapter's tensors as {base tensor: Factors} and {base tensor: full replacement}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    full: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        match = _FACTOR.match(name)
        if match is None:  # a full tensor: modules_to_save, an embedding's base layer, a trained bias
            target = name.replace(".base_layer.", ".")
            full[_known(folder, base, target, key)] = tensor
            continue
        module = match["module"] or match["emb"]
        if match["emb"]:
            embeddings.add(module)
        kind = match["kind"] or match["ekind"]
        pairs.setdefault(module, {})["A" if kind.endswith("A") else "B"] = tensor
    factors = {}
    fan_in_fan_out = bool(settings.get("fan_in_fan_out"))
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{folder}: module {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise ModelError(f"{folder}: module {module}: LoRA on convolutions is not supported")
        name = _known(folder, base, f"{module}.weight", module)
        embedding = module in embeddings
        transposed = embedding or fan_in_fan_out  # PEFT: an embedding's delta is (B @ A).T
        rows, cols = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if tuple(base.shape(name)) != (rows, cols) or a.shape[0] != b.shape[1]:
            raise ModelError(
                f"{folder}: module {module}: factors {list(b.shape)} @ {list(a.shape)} do not fit "
                f"{name} {list(base.shape(name))} of the base {base.path}; is this the adapter's base model?"
            )
        scale = _scale(settings, module, a.shape[0])
        factors[name] = Factors(b=b, a=a, scale=scale, transposed=transposed, embedding=embedding)
    for name, tensor in full.items():
        if tuple(tensor.shape) != tuple(base.shape(name)):
            raise ModelError(
                f"{folder}: its {name} has shape {list(tensor.shape)}, but the base {base.path} has "
                f"{list(base.shape(name))}; resize the base's embeddings as the adapter's were (added tokens) and "
                "merge the adapter into it first"
            )
    return factors, full


def _known(folder: Path, base: Checkpoint, name: str, key: str) -> str:
    if name not in base:
        raise ModelError(
            f"{folder}: adapter tensor {key} targets {name}, which the base {base.path} lacks; "
            "is this the adapter's base model?"
        )
    return name


__all__ = ["ADAPTER_CONFIG", "Factors", "LoraCheckpoint", "adapter_base", "adapter_nbytes", "add_delta", "is_adapter"]
