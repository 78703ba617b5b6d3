"""The refinement's training loss (not the search's objective, which is `study.trials.objective_of`): the search
tasks' examples as token ids, micro-batches of them, and losses.

    items = training_items(scorer, lm)                       # lm-eval's own requests, HFLM's tokenisation
    for batch in micro_batches(items, pad, lm.max_length, tokens=256):
        loss = answer_loss(model(batch.ids, attention_mask=batch.mask, logits_to_keep=batch.keep).logits, batch)

A loss (`Loss`) is any function of the model's logits on one micro-batch that returns that micro-batch's part
of the total: the refinement sums the parts (and accumulates their gradients), so a loss must add up over its
items, as a per-example objective does. `answer_loss` is the default (the reference answer's negative
log-likelihood, or the cross-entropy over a multiple-choice item's choices, weighted by task); a distillation
loss reads the same batch (its ids, its items) and compares the logits with a teacher's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from evomerge.scoring.scorer import Scorer

KINDS = ("loglikelihood", "multiple_choice", "generate_until")  # output types with an answer to score


@dataclass
class Item:
    """One scored example: token ids of its context and of each candidate continuation, and the right one."""

    task: str
    weight: float  # the task's share of the objective divided by its example count
    context: list[int]
    continuations: list[list[int]]
    gold: int  # index into continuations (0 for a single reference answer)


class Example(Protocol):
    """What a micro-batch and a loss read of an item: `Item` (the likelihood's) and `distill.DistillItem`
    (distillation's, which adds the owner's distributions) both have it."""

    task: str
    weight: float
    context: list[int]
    continuations: list[list[int]]
    gold: int


@dataclass
class MicroBatch:
    """Whole items (every continuation of each), right-padded: `ids` and `mask` are rows x width; the logits a
    loss gets are those of the last `keep` positions, which hold every target (`target`: rows x keep, -100
    where a position predicts no continuation token). `total_weight`: the weights of every item of every
    micro-batch, so that the parts add up to the weighted mean."""

    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    keep: int
    items: list[Example]
    total_weight: float

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


Loss = Callable[["torch.Tensor", MicroBatch], "torch.Tensor"]


def training_items(scorer: Scorer, lm: Any, examples: int | None = None) -> list[Item]:
    """The search tasks' examples as token ids, built with lm-eval's own requests and HFLM's tokenisation: each
    task's search subset, or with `examples`, up to that many of the task's examples (its whole search split, in a
    seeded order), so the gradient sees more than the sampler scores."""
    items: list[Item] = []
    unsupported = []
    for spec in scorer.specs:
        leaves = scorer.members[spec.name]
        for leaf in leaves:
            task = scorer.tasks[leaf]
            kind = task.OUTPUT_TYPE
            if kind not in KINDS:
                unsupported.append(f"{leaf} ({kind})")
                continue
            chosen = refinement_indices(scorer, leaf, examples)
            docs = [doc for i, doc in enumerate(task.eval_docs) if i in chosen]
            share = spec.weight / len(leaves) / max(len(docs), 1)
            for doc in docs:
                items.append(_item(task, doc, kind, leaf, share, lm))
    if unsupported:
        raise ConfigError(
            f"refine: tasks {', '.join(unsupported)} have no answer to score by likelihood; "
            "refine needs loglikelihood, multiple_choice or generate_until tasks"
        )
    return items


def _item(task, doc, kind: str, leaf: str, share: float, lm) -> Item:
    ctx = task.fewshot_context(doc, num_fewshot=task.get_config("num_fewshot") or 0)
    if isinstance(ctx, list):  # lm-eval's multiple-input form: several contexts, one continuation
        raise ConfigError(f"refine: task {leaf} has several contexts per example; refine cannot score it")
    delim = task.get_config("target_delimiter") or ""
    if kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_target(doc)
        gold = choices.index(gold) if isinstance(gold, str) else int(gold[0] if isinstance(gold, list) else gold)
        conts = [f"{delim}{c}" for c in choices]
    else:
        target = task.doc_to_target(doc)
        target = target[0] if isinstance(target, list) else target
        conts, gold = [f"{delim}{target}"], 0
    encoded = [lm._encode_pair(ctx, c) for c in conts]
    context = encoded[0][0]
    return Item(leaf, share, context, [c for _, c in encoded], gold)


def micro_batches(items: Sequence[Example], pad: int, max_length: int, tokens: int) -> list[MicroBatch]:
    """`items` in micro-batches of at most `tokens` positions (rows x padded width), so a forward's activations
    are bounded whatever the examples' lengths; an item's continuations stay together (a multiple-choice loss
    needs all of them), and an item larger than the budget is a batch of its own. Items are grouped by length,
    so that rows of one batch pad little."""
    total = sum(item.weight for item in items)
    order = sorted(items, key=lambda it: _width(it, max_length))
    out: list[MicroBatch] = []
    group: list[Example] = []
    rows, width = 0, 0
    for item in order:
        n, w = len(item.continuations), _width(item, max_length)
        if group and (rows + n) * max(width, w) > tokens:
            out.append(_batch(group, pad, max_length, total))
            group, rows, width = [], 0, 0
        group.append(item)
        rows, width = rows + n, max(width, w)
    if group:
        out.append(_batch(group, pad, max_length, total))
    return out


def _width(item: Example, max_length: int) -> int:
    """The positions of the item's longest row."""
    return min(len(item.context) + max(len(c) for c in item.continuations) - 1, max_length)


def _batch(items: list[Example], pad: int, max_length: int, total: float) -> MicroBatch:
    import torch

    seqs, spans = [], []
    for item in items:
        for cont in item.continuations:
            seq = (item.context + cont)[-(max_length + 1) :]
            n = min(len(cont), len(seq) - 1)  # targets in this row: the continuation's (last) tokens
            # position p predicts token p+1 of (context + continuation)
            seqs.append(seq[:-1])
            spans.append((len(seq) - 1 - n, seq[-n:]))
    width = max(map(len, seqs))
    first = min(start for start, _ in spans)  # the earliest position with a target
    keep = width - first
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in seqs])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in seqs])
    target = torch.tensor([[-100] * (s - first) + t + [-100] * (width - s - len(t)) for s, t in spans])
    return MicroBatch(ids, mask, target, keep, list(items), total)


def _loglik(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities per row, from the target positions' logits only (a
    log-softmax over every position would hold another rows x positions x vocabulary copy for the backward)."""
    import torch

    where = target != -100
    picked = logits[where].float()  # (targets, vocabulary)
    tok = picked.gather(-1, target[where].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    row = torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(target)[where]
    return tok.new_zeros(target.shape[0]).index_add(0, row, tok)


def logits_of(model: torch.nn.Module, batch: MicroBatch, device: torch.device | str) -> torch.Tensor:
    """The logits of the batch's last `keep` positions (transformers' `logits_to_keep`: the head runs on those
    only, so a large vocabulary costs rows x keep, not rows x width); a prefix every row shares (a chat template's
    system turn) runs once, for one row (scoring/prefix.py), and its gradients come back through its keys and
    values."""
    import inspect

    from evomerge.scoring.prefix import prefix_forward

    ids, mask = batch.ids.to(device), batch.mask.to(device)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        shared = prefix_forward(model, ids, mask, keep=batch.keep)  # the rows' common prefix once (a chat turn)
        if shared is not None:
            return shared
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=batch.keep).logits
    return model(input_ids=ids, attention_mask=mask).logits[:, -batch.keep :]


def pad_token_id(tok, eos: Sequence[int] = ()) -> int:
    """The id that pads a micro-batch: the tokenizer's pad token, else its end of sequence, else the first of `eos`
    (the model's own end-of-sequence ids), else 0. Padded positions are masked, so any id in the vocabulary does."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return int(eos[0]) if eos else 0


def refinement_indices(scorer: Scorer, leaf: str, examples: int | None) -> set[int]:
    """The examples of a leaf task the refinement trains on: its search subset, or with `examples` up to that many
    of its split in a seeded order of its own (the likelihood's and the distillation's are the same)."""
    if examples is None:
        return set(scorer.indices(leaf))
    order = list(range(len(scorer.tasks[leaf].eval_docs)))
    random.Random(f"{scorer.seed}:{leaf}:refine").shuffle(order)
    return set(order[:examples])


def answer_loss(logits: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """This micro-batch's part of the weighted mean of each item's loss: the gold continuation's NLL (one
    answer), or the cross-entropy over its choices (multiple choice)."""
    import torch

    loglik = _loglik(logits, batch.target.to(logits.device))
    total = loglik.new_zeros(())
    k = 0
    for item in batch.items:
        n = len(item.continuations)
        ll = loglik[k : k + n]
        k += n
        total = total + item.weight * (-(ll[item.gold]) if n == 1 else -(torch.log_softmax(ll, 0)[item.gold]))
    return total / batch.total_weight


__all__ = [
    "KINDS",
    "Example",
    "Item",
    "Loss",
    "MicroBatch",
    "answer_loss",
    "logits_of",
    "micro_batches",
    "pad_token_id",
    "refinement_indices",
    "training_items",
]
