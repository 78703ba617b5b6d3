"""lm-eval's HFLM around a resident model, with the per-call work that never changes done once.

Imported only when scoring (it imports lm-eval and torch). Each search trial scores the same requests
on new weights, so the request strings' tokenizations and the model's max length are computed on the
first call and reused; the forward passes, and so the scores, always use the model's current weights.

A batch of loglikelihood requests whose rows begin with the same tokens (a chat template's system turn, a task's
fixed few-shot examples) runs that prefix once: its keys and values are computed for one row and repeated for the
batch (`shared_prefix`), so a chat-templated multiple-choice task costs its questions, not its system prompt, per
example. The logits are those of the whole batch run at once (the same attention over the same keys; the per-example
scores of the real member's tasks are identical, tests/test_scoring.py checks a chat-templated task).
"""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
from lm_eval.models.huggingface import HFLM

SHARED_PREFIX_MIN = 8  # tokens: a shorter common prefix is run with the rest (the saving would not pay the copy)


class ResidentHFLM(HFLM):
    """HFLM(pretrained=<live model>): no copy, no move; tokenizations memoized across calls."""

    def __init__(self, model, tokenizer, batch_size: int):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.source = (model, tokenizer)
        self._encoded: dict[tuple, tuple[int, ...]] = {}

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kw
    ):
        key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kw.items())))
        ids = self._encoded.get(key)
        if ids is None:
            ids = self._encoded[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len, **kw))
        return list(ids)  # callers slice and concatenate: hand each its own list

    @cached_property
    def max_length(self) -> int:  # lm-eval re-resolves it from the config for every request
        return HFLM.max_length.fget(self)

    @cached_property
    def _cache_arg(self) -> str | None:
        """The forward's keyword for a KV cache (`cache`, or `past_key_values` before transformers renamed it);
        None where the model takes neither (then every batch runs whole)."""
        params = inspect.signature(self.model.forward).parameters
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        shared = shared_prefix(inps)
        if attn_mask is not None or labels is not None or shared < SHARED_PREFIX_MIN or self._cache_arg is None:
            return super()._model_call(inps, attn_mask, labels)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            head = self.model(inps[:1, :shared], use_cache=True)
            cache = getattr(head, "cache", None) or getattr(head, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return super()._model_call(inps, attn_mask, labels)
            cache.batch_repeat_interleave(inps.shape[0])
            rest = self.model(inps[:, shared:], use_cache=False, **{self._cache_arg: cache}).logits
        return torch.cat([head.logits.expand(inps.shape[0], -1, -1), rest], dim=1)


def shared_prefix(inps: torch.Tensor) -> int:
    """How many leading tokens every row of a batch has in common, at most all but the last (the rest must run)."""
    if inps.shape[0] < 2:
        return 0
    same = (inps == inps[:1]).all(dim=0).to(torch.int64)
    return min(int(same.cumprod(0).sum()), inps.shape[1] - 1)
