"""Distillation targets: the owner of each task is its best source, its targets are its own greedy answers and its
next-token distributions along them, and the loss is zero at the owner and positive away from it."""

from __future__ import annotations

import pytest
import torch

from evomerge.candidate.evaluator import Evaluator
from evomerge.refine.distill import distill_items, owners, source_scores
from evomerge.scoring.tasks import TaskSpec

SEARCH = [
    TaskSpec(name="zoo_add_greedy_search", subset=6),
    TaskSpec(name="zoo_reverse_greedy_search", subset=6),
    TaskSpec(name="zoo_add_search", subset=4),  # multiple choice
]


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return Evaluator([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH})


def test_owners_are_the_best_source_per_task_and_the_first_on_a_tie():
    scores = {"base": {"a": 0.5, "b": 0.2}, "x": {"a": 0.9, "b": 0.2}, "y": {"a": 0.1, "b": 0.3}}
    assert owners(scores) == {"a": "x", "b": "y"}
    assert owners({"base": {"a": 0.4}, "x": {"a": 0.4}}) == {"a": "base"}


def _greedy_alone(folder, context: list[int], eos: int, max_new: int) -> list[int]:
    """The owner's greedy answer, decoded one token at a time from its own folder (no batching, no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    seq = list(context)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == eos:
                break
    return seq[len(context) :]


def test_a_distillation_target_is_the_owners_greedy_answer(tiny_zoo, evaluator):
    mat, scorer = evaluator.materializer, evaluator.scorer("search")
    inputs = [str(tiny_zoo / n) for n in ("base", "add", "reverse")]
    scores = source_scores(mat, scorer, inputs)
    owner_of = owners(scores)
    assert set(owner_of) == set(scorer.tasks) and set(scores) == set(inputs)
    for leaf, owner in owner_of.items():
        assert scores[owner][leaf] == max(s[leaf] for s in scores.values())
    items = distill_items(mat, scorer, owner_of, inputs, top_k=5)
    assert sorted({i.task for i in items}) == sorted(scorer.tasks)
    eos = mat.tokenizer.eos_token_id
    generated = [i for i in items if i.choice_logp is None]
    assert len(generated) == 12
    for item in generated:
        answer = item.continuations[0]
        assert item.owner == owner_of[item.task]
        assert answer == _greedy_alone(item.owner, item.context, eos, max_new=len(answer) + (answer[-1] != eos))
        # the first of the owner's top tokens at each answer position is the token it answered
        assert [ids[0] for ids in item.top_ids] == answer
        assert all(0.0 < sum(torch.tensor(lp).exp().tolist()) <= 1.0 + 1e-6 for lp in item.top_logp)
    for item in (i for i in items if i.choice_logp is not None):
        assert len(item.choice_logp) == len(item.continuations) == 4
        assert sum(torch.tensor(item.choice_logp).exp().tolist()) == pytest.approx(1.0, abs=1e-5)
