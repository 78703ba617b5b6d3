"""lm-eval's HFLM around a resident model, with the per-call work that never changes done once.

Imported only when scoring (it imports lm-eval and torch). Each search trial scores the same requests
on new weights, so the request strings' tokenizations and the model's max length are computed on the
first call and reused; the forward passes, and so the scores, always use the model's current weights.

A batch of loglikelihood requests whose rows begin with the same tokens (a chat template's system turn, a task's
fixed few-shot examples) runs that prefix once: its keys and values are computed for one row and repeated for the
batch (scoring/prefix.py), so a chat-templated multiple-choice task costs its questions, not its system prompt, per
example. The logits are those of the whole batch run at once (the same attention over the same keys; the per-example
scores of the real member's tasks are identical, tests/test_real.py checks a chat-templated task).
"""

from __future__ import annotations

from functools import cached_property

import torch
from lm_eval.models.huggingface import HFLM

from evomerge.scoring.prefix import prefix_forward


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

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if attn_mask is None and labels is None:  # a causal LM's batch: its shared prefix once (scoring/prefix.py)
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=self.device.type,
                    dtype=self.mixed_precision_dtype,
                    enabled=self.mixed_precision_dtype is not None,
                ),
            ):
                logits = prefix_forward(self.model, inps)
            if logits is not None:
                return logits
        return super()._model_call(inps, attn_mask, labels)
