"""Distillation: a label-free objective for the gradient refinement.

    owner_of = owners(source_scores)                     # {task: the source model best at it}
    items = distill_items(materializer, scorer, owner_of, inputs, top_k=16)
    loss = distill_loss(logits, batch)                   # KL(owner || merge) along the owner's own answers

A merge replaces the routing oracle: each task answered by its best source model, its *owner*. Distillation aims
at that directly: on each search task's prompts the owner answers greedily, and the merge is trained towards the
owner's next-token distributions along that answer (KL(owner || merge) per answer token), the objective ProDistill-
and RegMean-style merges use. It needs prompts only (the reference answers are never read), and every answer token
carries a whole distribution, not one right token.

The owner's distribution is kept as its `top_k` most likely tokens and the rest's total mass: the KL of the
distribution coarsened to k + 1 outcomes, exact when the owner puts all its mass on the k, and small at any
vocabulary size. A multiple-choice task is distilled on the owner's distribution over the choices.

Items are the likelihood refinement's (`task`, `weight`, `context`, `continuations`, `gold`) plus the owner's
targets, so they batch the same way and `distill_loss` reads a batch as the likelihood loss does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from evomerge.merge.materialize import Materializer
    from evomerge.scoring.scorer import Scorer

GENERATIVE = ("loglikelihood", "generate_until")  # distilled along the owner's greedy answer
DEFAULT_MAX_NEW = 32  # answer tokens generated where a task gives no bound
TOP_K = 16


@dataclass
class DistillItem:
    """One prompt: the owner's greedy answer as the single continuation and, per answer token, its top-k next
    tokens and their log-probabilities; for multiple choice, each choice and the owner's log-softmax over them."""

    task: str
    weight: float  # the task's share of the objective divided by its example count
    context: list[int]
    continuations: list[list[int]]
    gold: int = 0
    owner: str = ""
    top_ids: list[list[int]] = field(default_factory=list)
    top_logp: list[list[float]] = field(default_factory=list)
    choice_logp: list[float] | None = None


def owners(source_scores: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """{task: the source whose score on it is highest}, from {source: {task: score}}; on a tie the first source in
    the mapping's order (list the base model first: it owns a task no fine-tune improves)."""
    tasks = dict.fromkeys(t for scores in source_scores.values() for t in scores)
    return {
        task: max(((src, s[task]) for src, s in source_scores.items() if task in s), key=lambda x: x[1])[0]
        for task in tasks
    }


def check_distillable(scorer: Scorer) -> None:
    """ConfigError unless every search task has prompts an owner can answer (or choices it can weigh)."""
    kinds = (*GENERATIVE, "multiple_choice")
    bad = [f"{leaf} ({task.OUTPUT_TYPE})" for leaf, task in scorer.tasks.items() if task.OUTPUT_TYPE not in kinds]
    if bad:
        raise ConfigError(
            f"refine.arms distill: tasks {', '.join(bad)} have no prompt to answer; distillation needs "
            "loglikelihood, generate_until or multiple_choice tasks (or leave distill out of refine.arms)"
        )


def source_scores(materializer: Materializer, scorer: Scorer, inputs: Sequence[str]) -> dict[str, dict[str, float]]:
    """{input model: {leaf task: its search objective value}}: each input alone in the resident model."""
    from evomerge.candidate.evaluator import alone

    out = {}
    for source in inputs:
        materializer.apply(alone(source, inputs))
        out[str(source)] = scorer.leaf_values(scorer.score(materializer.model, materializer.tokenizer))
    return out


def distill_items(
    materializer: Materializer,
    scorer: Scorer,
    owner_of: Mapping[str, str],
    inputs: Sequence[str],
    *,
    top_k: int = TOP_K,
    examples: int | None = None,
    batch: int = 64,
) -> list[DistillItem]:
    """Every search example's target: each owner's weights are loaded into the resident model in turn (the next
    merge overwrites them), it answers its tasks' prompts greedily and its distributions along the answers are
    kept. `owner_of`: {leaf task: input model}; `inputs`: every input model, the base included."""
    from evomerge.candidate.evaluator import alone
    from evomerge.refine.losses import pad_token_id

    check_distillable(scorer)
    model, tok = materializer.model, materializer.tokenizer
    lm = scorer.wrap(model, tok)
    eos = eos_ids(model, tok)
    pad = pad_token_id(tok, eos)
    out: list[DistillItem] = []
    for source in dict.fromkeys(owner_of.values()):
        materializer.apply(alone(source, inputs))
        for spec in scorer.specs:
            for leaf in scorer.members[spec.name]:
                if owner_of.get(leaf) != source:
                    continue
                docs = prompts(scorer, leaf, examples)
                weight = spec.weight / len(scorer.members[spec.name]) / max(len(docs), 1)
                for start in range(0, len(docs), batch):
                    chunk = docs[start : start + batch]
                    out += _items(scorer.tasks[leaf], leaf, source, weight, chunk, lm, eos, pad, top_k)
    return out


def prompts(scorer: Scorer, leaf: str, examples: int | None) -> list[tuple[dict, str]]:
    """(doc, context) of a leaf's refinement examples: its search subset, or with `examples` up to that many of
    its split in the seeded order the likelihood refinement uses."""
    from evomerge.refine.losses import refinement_indices

    task = scorer.tasks[leaf]
    chosen = refinement_indices(scorer, leaf, examples)
    out = []
    for i, doc in enumerate(task.eval_docs):
        if i in chosen:
            ctx = task.fewshot_context(doc, num_fewshot=task.get_config("num_fewshot") or 0)
            if isinstance(ctx, list):
                raise ConfigError(f"refine: task {leaf} has several contexts per example; it cannot be distilled")
            out.append((doc, ctx))
    return out


def eos_ids(model: torch.nn.Module, tok: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's end of sequence and the model's generation config's."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = config if isinstance(config, list) else [config]
    ids = [t for t in dict.fromkeys([tok.eos_token_id, *extra]) if t is not None]
    if not ids:
        raise ConfigError("refine.arms distill: the tokenizer has no end-of-sequence token to end an answer")
    return ids


def _items(task, leaf, source, weight, docs, lm, eos, pad, top_k) -> list[DistillItem]:
    """One batch of a leaf's prompts, answered (or weighed, for multiple choice) by the resident owner."""
    import torch

    model = lm.model
    delim = task.get_config("target_delimiter") or ""
    if task.OUTPUT_TYPE == "multiple_choice":
        out = []
        for doc, ctx in docs:
            pairs = [lm._encode_pair(ctx, f"{delim}{c}") for c in task.doc_to_choice(doc)]
            context, conts = pairs[0][0], [c for _, c in pairs]
            logp = torch.tensor([_loglik(model, context, c) for c in conts])
            soft = torch.log_softmax(logp, 0).tolist()
            out.append(DistillItem(leaf, weight, context, conts, owner=source, choice_logp=soft))
        return out
    contexts = [lm.tok_encode(ctx) for _, ctx in docs]
    answers = greedy(model, contexts, _max_new(task, lm, docs), eos, pad)
    tops = _top(model, list(zip(contexts, answers)), top_k)
    return [
        DistillItem(leaf, weight, c, [a], owner=source, top_ids=ids, top_logp=lp)
        for c, a, (ids, lp) in zip(contexts, answers, tops)
    ]


def greedy(
    model: torch.nn.Module, contexts: Sequence[list[int]], max_new: int, eos: Sequence[int], pad: int
) -> list[list[int]]:
    """Each context's greedy continuation (token ids, up to and including an `eos` token, at most `max_new`),
    decoded in one left-padded batch on the model's device."""
    import torch

    device = next(model.parameters()).device
    width = max(map(len, contexts))
    ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c in contexts], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    done = torch.zeros(len(contexts), dtype=torch.bool, device=device)
    stop = torch.tensor(list(eos), device=device)
    out: list[list[int]] = [[] for _ in contexts]
    with torch.no_grad():
        for _ in range(max_new):
            position = (mask.cumsum(-1) - 1).clamp_min(0)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=position).logits[:, -1].float().argmax(-1)
            for row in (~done).nonzero().flatten().tolist():
                out[row].append(int(nxt[row]))
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return out


def _top(
    model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]], k: int
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """For (context, answer) rows: per answer token, the model's top-k next-token ids and log-probabilities."""
    import torch

    device = next(model.parameters()).device
    seqs = [c + a for c, a in rows]
    width = max(map(len, seqs)) - 1
    ids = torch.tensor([s[:-1] + [0] * (width - len(s) + 1) for s in seqs], device=device)
    mask = torch.tensor([[1] * (len(s) - 1) + [0] * (width - len(s) + 1) for s in seqs], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for i, (c, a) in enumerate(rows):
        values, index = logp[i, len(c) - 1 : len(c) - 1 + len(a)].topk(min(k, logp.shape[-1]), -1)
        out.append((index.tolist(), values.tolist()))
    return out


def _loglik(model: torch.nn.Module, context: list[int], cont: list[int]) -> float:
    import torch

    device = next(model.parameters()).device
    seq = torch.tensor([context + cont], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq[:, :-1]).logits.float(), -1)[0, len(context) - 1 :]
    return float(logp.gather(-1, torch.tensor(cont, device=device).unsqueeze(-1)).sum())


def _max_new(task, lm, docs) -> int:
    """Answer tokens to generate: the task's `max_gen_toks` (generate_until), else the longest reference
    answer's length plus 8 (loglikelihood; the answer is never read otherwise)."""
    if task.OUTPUT_TYPE == "generate_until":
        return int((task.get_config("generation_kwargs") or {}).get("max_gen_toks", DEFAULT_MAX_NEW))
    delim = task.get_config("target_delimiter") or ""
    lengths = []
    for doc, ctx in docs:
        target = task.doc_to_target(doc)
        target = target[0] if isinstance(target, list) else target
        lengths.append(len(lm._encode_pair(ctx, f"{delim}{target}")[1]))
    return max(lengths) + 8 if lengths else DEFAULT_MAX_NEW


def kl_top(logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(owner || merge) per position over the owner's top-k tokens plus one outcome for the rest: `logp`
    [..., V] the merge's log-probabilities, `top_ids` and `top_logp` [..., k] the owner's."""
    p = top_logp.exp()
    merge_top = logp.gather(-1, top_ids)
    kl = (p * (top_logp - merge_top)).sum(-1)
    rest_owner = 1 - p.sum(-1)
    rest_merge = (1 - merge_top.exp().sum(-1)).clamp_min(1e-12)
    rest = rest_owner.clamp_min(0) * (rest_owner.clamp_min(1e-12).log() - rest_merge.log())
    return kl + rest


def distill_loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """This micro-batch's part of the weighted mean over items of KL(owner || merge): summed along a generated
    answer's tokens, or over a multiple-choice item's choices. `logits`: rows x positions x vocabulary of the
    batch's target positions (`batch.target`: -100 where a position predicts no answer token)."""
    import torch

    target = batch.target.to(logits.device)
    where = target != -100
    logp = torch.log_softmax(logits[where].float(), -1)  # (targets, vocabulary), row by row
    per_row = where.sum(-1).tolist()
    total = logp.new_zeros(())
    at = row = 0
    for item in batch.items:
        n_rows = len(item.continuations)
        counts = per_row[row : row + n_rows]
        span = logp[at : at + sum(counts)]
        if item.choice_logp is None:
            n = counts[0]  # the answer's last n tokens (a long context is cut from the left)
            ids = torch.tensor(item.top_ids[-n:], device=logp.device)
            lp = torch.tensor(item.top_logp[-n:], device=logp.device)
            loss = kl_top(span, ids, lp).sum()
        else:
            tokens = target[where][at : at + sum(counts)]
            tok = span.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            ll = torch.stack([part.sum() for part in tok.split(counts)])
            owner = torch.tensor(item.choice_logp, device=logp.device)
            loss = (owner.exp() * (owner - torch.log_softmax(ll, 0))).sum()
        total = total + item.weight * loss
        at += sum(counts)
        row += n_rows
    return total / batch.total_weight


__all__ = [
    "DistillItem",
    "check_distillable",
    "distill_items",
    "distill_loss",
    "eos_ids",
    "greedy",
    "kl_top",
    "owners",
    "source_scores",
]
