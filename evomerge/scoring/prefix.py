"""A batch's shared prefix, run once: the rows of a batch that begin with the same tokens (a chat template's system
turn, a task's fixed few-shot examples) need those tokens' keys and values only once.

    shared = shared_prefix(ids)                     # leading tokens every row has in common
    logits = prefix_forward(model, ids, keep=4)      # the last 4 positions' logits, the prefix run for one row

lm-eval's scoring (scoring/lm.py) and the refinement's forward (refine/losses.py) both run their batches through
`prefix_forward`; the time plan (capacity/timing.py) counts what it saves. The logits are those of the whole batch
run at once (the same attention over the same keys and values, up to rounding), and gradients flow through the
repeated keys and values to the prefix's own pass.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SHARED_PREFIX_MIN = 8  # tokens: a shorter common prefix runs with the rest (the saving would not pay the extra pass)


def shared_prefix(ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """How many leading tokens every row of a batch has in common (unmasked), at most all but the last position."""
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0)
    if attention_mask is not None:
        same = same & attention_mask.bool().all(dim=0)
    return min(int(same.long().cumprod(0).sum()), ids.shape[1] - 1)


def cache_keyword(model: Any) -> str | None:
    """The model's forward keyword for a KV cache (`cache`, or `past_key_values` before transformers renamed it);
    None where it takes neither (then batches run whole). Read once per model class."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(cls: type) -> str | None:
    params = inspect.signature(cls.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def prefix_forward(
    model: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, keep: int | None = None
) -> torch.Tensor | None:
    """The logits of `ids` (rows x width) at every position, or the last `keep`, with the rows' shared prefix run
    for one row and the rest of the batch on its keys and values; None where the batch shares too little, or the
    model takes no cache (run it whole)."""
    import torch

    width = ids.shape[1]
    shared = shared_prefix(ids, attention_mask)
    if keep is not None:
        shared = min(shared, width - keep)  # every kept position is in the rest
    keyword = cache_keyword(model)
    if shared < SHARED_PREFIX_MIN or keyword is None:
        return None
    head = model(input_ids=ids[:1, :shared], use_cache=True)
    cache = getattr(head, "cache", None) or getattr(head, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(ids.shape[0])
    rest: dict[str, Any] = {keyword: cache, "use_cache": False}
    if attention_mask is not None:
        rest["attention_mask"] = attention_mask
    if keep is not None:
        rest["logits_to_keep"] = keep
        return model(input_ids=ids[:, shared:], **rest).logits
    tail = model(input_ids=ids[:, shared:], **rest).logits
    return torch.cat([head.logits.expand(ids.shape[0], -1, -1), tail], dim=1)


__all__ = ["SHARED_PREFIX_MIN", "cache_keyword", "prefix_forward", "shared_prefix"]
