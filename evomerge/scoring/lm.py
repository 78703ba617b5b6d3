"""lm-eval's HFLM around a resident model, with the per-call work that never changes done once.

Imported only when scoring (it imports lm-eval and torch). Each search trial scores the same requests
on new weights, so the request strings' tokenizations and the model's max length are computed on the
first call and reused; the forward passes, and so the scores, always use the model's current weights.
"""

from __future__ import annotations

from functools import cached_property

from lm_eval.models.huggingface import HFLM


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
