"""The refinement's memory footprint (refine/tensor.py's docstring has the formula): what a resource plan budgets.

    extra = refine_extra_bytes(config, param_bytes, models=3, largest=..., dtype_bytes=2, tokens=1024)
    extra["device"]      # bytes a round adds on the resident model's device; extra["host"]: DELLA's masks

`config` is the model's HF `config.json` (Llama-style names; GPT-2's are read too); the activation term is
Llama-family's with SDPA attention (tests/test_refine.py checks it against what autograd saves).
"""

from __future__ import annotations

from typing import Any

MICRO_BATCH_TOKENS = 256  # positions (rows x padded width) per forward/backward where the model's shape is unknown


def token_bytes(config: dict[str, Any], dtype_bytes: int) -> int | None:
    """What the backward keeps of one position (all layers) of a Llama-family model, from its HF `config.json`
    (SDPA attention; None where the config lacks the shape)."""
    try:
        h = int(config.get("hidden_size") or config["n_embd"])
        i = int(config.get("intermediate_size") or config.get("n_inner") or 4 * h)
        layers = int(config.get("num_hidden_layers") or config["n_layer"])
        heads = int(config.get("num_attention_heads") or config["n_head"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(config.get("num_key_value_heads") or heads) * (h // heads)
    return (layers * (8 * h + 2 * kv + 4 * i) + 3 * h) * dtype_bytes


def default_micro_batch_tokens(config: dict[str, Any], model_bytes: int, dtype_bytes: int) -> int:
    """Positions per micro-batch when the caller gives none: activations of about half the model's bytes (64 MiB
    at least, where a tiny model would pay more for the passes than for the memory)."""
    per = token_bytes(config, dtype_bytes)
    if not per:
        return MICRO_BATCH_TOKENS
    return max(16, max(model_bytes // 2, 64 << 20) // per)


def model_micro_batch_tokens(model) -> int:
    """`default_micro_batch_tokens` of a loaded transformers model (its config, parameter bytes and dtype)."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    itemsize = next(model.parameters()).element_size()
    return default_micro_batch_tokens(model.config.to_dict(), nbytes, itemsize)


# A refinement step's forward and backward cost about 6 x parameters x positions; past this many parameter-positions
# per step a step trains on fewer examples than the search subsets (refine_examples). The toy zoos (up to ~1M
# parameters, a few thousand positions) stay far below it; at 135M parameters it allows ~400 positions a step.
STEP_PARAM_POSITIONS = 5 * 10**10
MIN_REFINE_EXAMPLES = 8  # per task: below this a step's gradient is one example's noise


def refine_examples(materializer, scorer, budget: int = STEP_PARAM_POSITIONS) -> int | None:
    """Examples per task a refinement step trains on when `refine.examples` is unset (`examples_per_task` of the
    resident model's parameters and the search subsets' positions), drawn from each task's split in the
    refinement's seeded order."""
    from evomerge.refine.losses import training_items

    params = sum(p.numel() for p in materializer.model.parameters())
    items = training_items(scorer, scorer.wrap(materializer.model, materializer.tokenizer))
    positions = sum(len(it.context) + len(c) for it in items for c in it.continuations)
    largest = max(len(scorer.indices(leaf)) for leaf in scorer.tasks)
    return examples_per_task(params, positions, largest, budget)


def examples_per_task(params: int, positions: int, largest: int, budget: int = STEP_PARAM_POSITIONS) -> int | None:
    """None (each task's search subset, as always) while parameters x the subsets' positions fit `budget`, else the
    share of the largest subset that fits, at least MIN_REFINE_EXAMPLES. The resource plan prices the refinement
    with the same rule."""
    if params * positions <= budget:
        return None
    return max(MIN_REFINE_EXAMPLES, int(largest * budget / (params * positions)))


def refine_extra_bytes(
    config: dict[str, Any],
    param_bytes: int,
    models: int,
    *,
    largest: int,
    dtype_bytes: int = 4,
    tokens: int = MICRO_BATCH_TOKENS,
    answer_tokens: int | None = None,
    threads: int = 1,
    accelerator: bool = False,
    della: bool = False,
) -> dict[str, int]:
    """The memory a refinement adds to a worker (the module docstring's formula), from an HF `config.json`
    (Llama-style names), `param_bytes` (the resident parameters the round moves: the model's bytes when every
    kind is searched) and `largest` (the largest of them, its gradient's accumulation transient), in dtype
    `dtype_bytes`. `tokens`: the micro-batch's positions; `answer_tokens`: the positions its loss reads (default:
    all, a bound); `threads`: the kernel threads on CPU; `accelerator`: the resident model on a GPU. Returns each
    term, `device` (their sum, on the resident model's device) and `host` (DELLA's bit-packed masks)."""
    from evomerge.refine.differentiable import CPU_CHUNK, DEVICE_CHUNK

    b = dtype_bytes
    answers = tokens if answer_tokens is None else answer_tokens
    chunk = DEVICE_CHUNK if accelerator else CPU_CHUNK * threads
    out = {
        "gradient": param_bytes,
        "accumulation": largest,
        "activations": tokens * (token_bytes(config, b) or 0),
        "logits": answers * int(config["vocab_size"]) * (2 * b + 8),  # the head's output, float32 copy, gradients
        "chunks": ((2 * models + 6) * 4 + 2 * b) * chunk + ((models + 2) * b * chunk if accelerator else 0),
    }
    # on CPU, glibc keeps the first micro-batch's freed activations beside the next one's (measured: 0.7-1x of
    # them at 30M and 100M); a GPU's caching allocator hands the same blocks back
    out["allocator"] = 0 if accelerator else out["activations"]
    out["device"] = sum(out.values())
    out["host"] = models * param_bytes // b // 8 if della else 0
    return out


__all__ = [
    "MICRO_BATCH_TOKENS",
    "MIN_REFINE_EXAMPLES",
    "STEP_PARAM_POSITIONS",
    "default_micro_batch_tokens",
    "model_micro_batch_tokens",
    "examples_per_task",
    "refine_examples",
    "refine_extra_bytes",
    "token_bytes",
]
