"""Where a resident model lives: one device, or sharded over a worker's GPUs with accelerate's device map.

    model = resident_model(config, torch.bfloat16, ["cuda:0", "cuda:1"])   # layers split over two GPUs
    shard_map(meta_model, 2, 80 * 2**30)                                    # {module: slot}: what the split is

A worker with `workers.num_gpus: N > 1` holds its resident model split over its N GPUs the way transformers'
`device_map="balanced"` splits a model users load themselves: accelerate's `get_balanced_memory` and
`infer_auto_device_map` (decoder layers never split), then `dispatch_model`, whose hooks move activations from
one GPU to the next. The parameters are allocated empty on their own device (built on the meta device first, so
no copy of the model is ever made in host memory) and every one is then written by the merge, each merged tensor
computed on the device where its parameter lives.

The devices are names (`cuda:1`), so a test can shard over two CPU "devices" (`["cpu", "cpu"]`): the same map,
placement and hooks run, on one memory; `model.evomerge_slots` says which device of the list holds each module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


@contextmanager
def _quiet_accelerate():
    """accelerate warns that integer slots name no CUDA device when we plan on a CPU; the slots are ours."""
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def meta_model(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of `config` with its parameters on the meta device (no memory) and its buffers real (rotary
    frequencies are computed at build time and are not in any checkpoint); a tied head shares its embeddings."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model


def shard_map(model: PreTrainedModel, slots: int, budget: int | Sequence[int]) -> dict[str, int]:
    """{module name: slot 0..slots-1}: accelerate's balanced device map of `model` (meta or real) over `slots`
    devices of `budget` bytes each (or one budget per slot), decoder layers kept whole. ConfigError naming
    `workers.num_gpus` when the parameters do not fit the slots."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    budgets = [budget] * slots if isinstance(budget, int) else list(budget)
    keep_whole = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    with _quiet_accelerate():
        memory = {i: int(b) for i, b in enumerate(budgets)}
        if slots > 1:
            memory = get_balanced_memory(
                model, max_memory=memory, no_split_module_classes=keep_whole, dtype=dtype, low_zero=False
            )
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=keep_whole, dtype=dtype)
    outside = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if outside:
        raise ConfigError(
            f"workers.num_gpus: the resident model does not fit {slots} device(s) of {min(budgets) / 2**30:.1f} GB "
            f"(accelerate would put part of it on {', '.join(outside)}); give each worker more GPUs"
        )
    return dict(device_map)


def slot_bytes(model: PreTrainedModel, device_map: dict[str, int], slots: int) -> list[int]:
    """Bytes of parameters each slot holds under `device_map` (tied parameters counted once)."""
    out = [0] * slots
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        out[device_map[_module_key(name, device_map)]] += param.numel() * param.element_size()
    return out


def resident_model(
    config: PretrainedConfig,
    dtype: torch.dtype,
    devices: Sequence[str],
    *,
    trust_remote_code: bool = False,
    budget: int | Sequence[int] | None = None,
) -> PreTrainedModel:
    """An empty resident model (every parameter allocated, none initialized: the merge writes them all) on
    `devices`: one device, or split over several (`budget`: bytes each may hold; default: each device's
    total memory, less a tenth for activations)."""
    import torch

    model = meta_model(config, dtype, trust_remote_code)
    slots = len(devices)
    shards = {"": 0} if slots == 1 else shard_map(model, slots, budget or _budgets(devices))
    placement = {m: devices[s] for m, s in shards.items()}
    for name, param in list(model.named_parameters()):  # tied parameters appear once
        target = torch.device(placement[_module_key(name, placement)])
        _set_parameter(model, name, torch.empty(param.shape, dtype=param.dtype, device=target))
    model.tie_weights()
    if slots == 1:
        model.to(devices[0])  # the buffers
    else:
        from accelerate import dispatch_model

        # hooks move each block's inputs to its device (and the outputs back to the first); force_hooks also when
        # every slot is the same device (the CPU test of this path)
        with _quiet_accelerate():
            dispatch_model(model, device_map=placement, main_device=devices[0], force_hooks=True)
    model.evomerge_slots = shards  # {module: index into devices}: which of the group's devices holds what
    return model.eval()


def _module_key(name: str, device_map: dict) -> str:
    """The device map's entry for a parameter: its longest module prefix in the map ("" is the whole model)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return key
    raise KeyError(f"{name} is in no module of the device map")


def _set_parameter(model, name: str, value: torch.Tensor) -> None:
    import torch

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters[leaf]
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)


def _budgets(devices: Sequence[str]) -> list[int]:
    import torch

    out = []
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            out.append(int(free * 0.9))
        else:
            import os

            out.append(int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9))
    return out


def group_devices(num_gpus: float) -> list[str]:
    """The devices of a worker given `num_gpus` (Ray sets CUDA_VISIBLE_DEVICES to its GPUs): ["cpu"], ["cuda"]
    for a share of one GPU, or ["cuda:0", ..., "cuda:N-1"] for N whole GPUs. ConfigError when torch sees fewer
    GPUs than asked (a CPU build of torch on a GPU node, say)."""
    import torch

    if num_gpus <= 0:
        return ["cpu"]
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = max(1, int(num_gpus))
    if seen < want:
        raise ConfigError(
            f"workers.num_gpus: this worker was given {num_gpus:g} GPU(s) but torch {torch.__version__} sees "
            f"{seen}; install a CUDA build of torch on every node, or set workers.num_gpus: 0"
        )
    return ["cuda"] if want == 1 else [f"cuda:{i}" for i in range(want)]


__all__ = ["group_devices", "meta_model", "resident_model", "shard_map", "slot_bytes"]
