"""Open the models a merge names: full checkpoints, PEFT LoRA adapters (a folder, or mergekit's `BASE+ADAPTER`).

    opened = open_inputs(["zoo/add", "adapters/rev", "zoo/base+adapters/dup"], base_model="zoo/base")
    opened["adapters/rev"]          # LoraCheckpoint over zoo/base, which every input here shares (mapped once)
    lora_form("adapters/rev", opened["adapters/rev"])   # 'zoo/base+adapters/rev', what mergekit-yaml reads

An adapter folder (adapter_config.json + adapter_model.safetensors) named alone merges over the recipe's or the
config's base_model; where the adapter's `base_model_name_or_path` is a local folder it must be that one (else a
one-line error: name the pair explicitly as `BASE+ADAPTER`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from evomerge.errors import ModelError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.lora import LoraCheckpoint, adapter_base, is_adapter

Input = Checkpoint | LoraCheckpoint


def split_ref(ref: str | os.PathLike) -> tuple[str, str | None]:
    """(model, adapter) of mergekit's `MODEL+ADAPTER` form; (ref, None) for a plain folder (one whose own name has
    a `+` included: an existing folder is never split)."""
    ref = str(ref)
    if "+" not in ref or os.path.isdir(ref):
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise ModelError(f"{ref}: a model with an adapter is written MODEL+ADAPTER (one '+'), as mergekit reads it")
    return parts[0], parts[1]


def ref_key(ref: str | os.PathLike) -> str:
    """The resolved form of a model reference (each half of `MODEL+ADAPTER` resolved): what keys loaded inputs."""
    model, adapter = split_ref(ref)
    key = str(Path(model).expanduser().resolve())
    return key if adapter is None else f"{key}+{Path(adapter).expanduser().resolve()}"


def resolve_ref(ref: str, base_dir: Path) -> str:
    """A reference with relative halves made absolute against `base_dir` (a recipe's or config's folder)."""

    def fix(part: str) -> str:
        if part.startswith("~"):
            return os.path.expanduser(part)
        return part if os.path.isabs(part) else os.path.normpath(base_dir / part)

    if not ref:
        return ref
    if "+" in ref and not os.path.isdir(fix(ref)):
        model, adapter = split_ref(ref)
        if adapter is not None:
            return f"{fix(model)}+{fix(adapter)}"
    return fix(ref)


def open_inputs(
    refs: Sequence[str],
    base_model: str | None = None,
    *,
    allow_pickle: bool = False,
    opened: dict[str, Checkpoint] | None = None,
) -> dict[str, Input]:
    """{ref: the opened model} for every reference, each full checkpoint opened once (an adapter's base shares the
    mapping with the same folder listed as a model). `opened` (folder key -> Checkpoint) carries that sharing
    across calls. ModelError (naming the reference) for what cannot be read."""
    opened = {} if opened is None else opened

    def checkpoint(folder: str) -> Checkpoint:
        key = ref_key(folder)
        if key not in opened:
            opened[key] = Checkpoint(folder, allow_pickle=allow_pickle)
        return opened[key]

    out: dict[str, Input] = {}
    for ref in refs:
        model, adapter = split_ref(ref)
        if adapter is not None:
            if not is_adapter(adapter):
                raise ModelError(
                    f"{adapter}: not a PEFT adapter folder (no adapter_config.json); fix the path after '+'"
                )
            out[ref] = LoraCheckpoint(checkpoint(model), adapter, allow_pickle=allow_pickle)
        elif is_adapter(model):
            base = adapter_home(model, base_model)
            out[ref] = LoraCheckpoint(checkpoint(base), model, allow_pickle=allow_pickle)
        else:
            out[ref] = checkpoint(model)
    return out


def adapter_home(adapter: str, base_model: str | None) -> str:
    """The base an adapter folder named alone merges over: `base_model`, which must be the adapter's own
    `base_model_name_or_path` where that is a local folder; that folder when there is no base_model."""
    recorded = adapter_base(adapter)
    local = recorded is not None and os.path.isdir(recorded)
    if base_model is None:
        if local:
            return str(recorded)
        raise ModelError(
            f"{adapter}: a LoRA adapter needs its base model; set base_model, or write it as BASE+ADAPTER"
            + (f" (its adapter_config.json names {recorded!r}, which is not a local folder)" if recorded else "")
        )
    base, _ = split_ref(base_model)
    if local and ref_key(recorded) != ref_key(base):
        raise ModelError(
            f"{adapter}: its adapter_config.json base_model_name_or_path is {recorded}, not the base_model {base}; "
            f"merge it over its own base, or write {base}+{adapter} to apply it to this one"
        )
    return base


def lora_form(ref: str, model: Input) -> str:
    """The reference as mergekit reads it: `BASE+ADAPTER` for an adapter, the folder for a full checkpoint."""
    if isinstance(model, LoraCheckpoint):
        return f"{model.base.path}+{model.path}"
    return ref


def published_refs(opened: Mapping[str, Input]) -> dict[str, str]:
    """{ref: mergekit's form} for the adapters named as bare folders (the only references that change)."""
    return {ref: lora_form(ref, m) for ref, m in opened.items() if lora_form(ref, m) != ref}


__all__ = ["Input", "adapter_home", "lora_form", "open_inputs", "published_refs", "ref_key", "resolve_ref", "split_ref"]
