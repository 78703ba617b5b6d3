"""A worker whose resident model is split over several devices (`workers.num_gpus: N > 1`, merge/placement.py)
merges and scores exactly as one on a single device.

CI has no GPU, so the split runs over two CPU "devices" (`["cpu", "cpu"]`, the list a two-GPU worker gets as
`["cuda:0", "cuda:1"]`): the same balanced device map (half the layers on each list entry), the same empty
allocation per entry, the same dispatch hooks moving activations from one entry to the next, and the same
per-tensor merge onto each parameter's device run as on two GPUs. We chose this over a meta-device test because
it runs the merge and lm-eval end to end; what one CPU cannot show (copies between two real memories)
bench/gpu_check.py checks on a GPU machine. The plan's split of a 70B model on the meta device is in
tests/test_capacity.py.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.candidate.evaluator import Evaluator
from evomerge.merge.recipe import Recipe
from evomerge.scoring import TaskSpec

TWO = ["cpu", "cpu"]


def _recipe(zoo, method: str) -> Recipe:
    models = [
        {"model": str(zoo / m), "parameters": {"weight": w, "density": 0.6}}
        for m, w in (("add", 0.8), ("reverse", 0.6))
    ]
    return Recipe.model_validate(
        {
            "merge_method": method,
            "base_model": str(zoo / "base"),
            "models": models,
            "dtype": "float32",
            "evomerge": {"seed": 3},
        }
    )


@pytest.fixture(scope="module")
def evaluators(tiny_zoo):
    tasks = {"search": [TaskSpec(name="zoo_add_search", subset=30), TaskSpec(name="zoo_reverse_search", subset=30)]}
    args = ([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", tasks)
    return Evaluator(*args), Evaluator(*args, device=TWO)


def test_the_split_model_spans_both_devices(evaluators):
    _, split = evaluators
    slots = split.model.evomerge_slots
    layers = {name: slot for name, slot in slots.items() if ".layers." in name}
    assert set(layers.values()) == {0, 1}, slots  # decoder layers on each device, whole
    assert slots["model.embed_tokens"] == 0 and slots["lm_head"] == 1
    assert sorted(layers.values()) == list(layers.values())  # contiguous: layer i+1 on the same device or the next
    assert any(hasattr(m, "_hf_hook") for m in split.model.modules())  # accelerate moves activations between them


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_a_split_worker_merges_and_scores_as_one(evaluators, tiny_zoo, method):
    one, split = evaluators
    recipe = _recipe(tiny_zoo, method)
    a = one.evaluate(recipe, "search", examples=True)
    b = split.evaluate(recipe, "search", examples=True)
    for name, tensor in one.materializer.targets.items():
        assert torch.equal(tensor, split.materializer.targets[name]), name
    assert a.scores == b.scores and a.examples == b.examples
    assert 0 < a.objective < 1  # a real score, not an all-wrong model that any bug would also give


def test_the_split_model_is_allocated_once(evaluators):
    """Each parameter is one tensor on its device (no host copy of the model behind it) and a tied head would be
    the embeddings' own tensor: every stored tensor has a place of its own."""
    _, split = evaluators
    ptrs = [t.data_ptr() for t in split.materializer.targets.values()]
    assert len(ptrs) == len(set(ptrs))
    assert sum(p.numel() for p in split.model.parameters()) == sum(
        t.numel() for t in split.materializer.targets.values()
    )


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "gpt_neox"])
def test_split_architectures_with_tied_or_renamed_heads(arch_family, arch):
    """Tied embeddings (Gemma, GPT-2: the head is the embeddings, on the first device) and renamed heads
    (GPT-NeoX's embed_out) split and merge like the single-device model, logits and all."""
    paths = arch_family(arch)
    models, base = [paths["a"], paths["b"]], paths["base"]
    recipe = Recipe.model_validate(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.5}} for m in models],
            "dtype": "float32",
        }
    )
    from evomerge.merge.materialize import Materializer

    one, split = Materializer(models, base), Materializer(models, base, device=TWO)
    one.apply(recipe)
    split.apply(recipe)
    assert set(split.model.evomerge_slots.values()) == {0, 1}
    ids = torch.tensor([[1, 5, 9, 13, 7, 3]])
    with torch.no_grad():
        assert torch.equal(one.model(ids).logits, split.model(ids).logits)
