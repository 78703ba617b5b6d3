"""Per-row refinement: its merge is the real merge of the recipe with the coefficient file, its steps lower the loss
(likelihood and distillation), and a search scores its path as trials that export as evomerge-only recipes."""

from __future__ import annotations

import pytest
import torch

from evomerge.evaluator import Evaluator
from evomerge.merge.coefficients import key, write_coefficients
from evomerge.recipe import CoefficientFile
from evomerge.scoring.tasks import TaskSpec
from evomerge.search.rows import BOUNDS, RowRefiner
from evomerge.space import SearchSpace, load_space_spec, num_layers

SEARCH = [TaskSpec(name="zoo_add_greedy_search", subset=12), TaskSpec(name="zoo_reverse_greedy_search", subset=12)]


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return Evaluator([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH})


def _refiner(zoo, evaluator, loss="likelihood"):
    space = SearchSpace(load_space_spec("task_arithmetic"), num_layers(zoo / "base"))
    models = [str(zoo / "add"), str(zoo / "reverse")]
    ref = RowRefiner(
        evaluator.materializer,
        evaluator.scorer("search"),
        space,
        models,
        str(zoo / "base"),
        "task_arithmetic",
        loss=loss,
    )
    return ref, space, models


def test_the_row_surrogate_is_the_merge_with_its_coefficient_file(tiny_zoo, evaluator, tmp_path):
    ref, space, models = _refiner(tiny_zoo, evaluator)
    point = {
        name: ps.low + (i % 5 + 1) / 8 * (ps.high - ps.low) for i, (name, ps) in enumerate(space.bounds(models).items())
    }
    g = torch.Generator().manual_seed(1)
    names = list(evaluator.materializer.targets)
    coefficients = {
        key(i, n): torch.rand(evaluator.materializer.targets[n].shape[0], generator=g) * 2
        for i in range(2)
        for n in names[::3]
    }
    ref.write(point, coefficients)
    surrogate = {n: t.clone() for n, t in evaluator.materializer.targets.items()}
    digest = write_coefficients(tmp_path / "c.safetensors", coefficients)
    recipe = space.to_recipe(point, models, str(tiny_zoo / "base"), "task_arithmetic", seed=0)
    recipe = recipe.with_provenance(coefficients=CoefficientFile(file=str(tmp_path / "c.safetensors"), sha256=digest))
    evaluator.load(recipe)
    for name, tensor in evaluator.materializer.targets.items():
        torch.testing.assert_close(surrogate[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["likelihood", "distill"])
def test_a_row_refinement_lowers_its_loss_inside_the_bounds(tiny_zoo, evaluator, loss):
    ref, space, models = _refiner(tiny_zoo, evaluator, loss)
    start = space.defaults(models)
    path = ref.run(start, steps=8, every=4, lr=0.05)
    assert [step for step, *_ in path] == [0, 4, 8]
    assert all(point == start for _, point, _, _ in path)  # the recipe's own numbers stay; the rows move
    losses = [loss for _, _, loss, _ in path]
    assert losses[-1] < losses[0]
    first, last = path[0][3], path[-1][3]
    assert all(torch.equal(v, torch.ones_like(v)) for v in first.values())
    assert any(not torch.equal(v, torch.ones_like(v)) for v in last.values())
    assert all(BOUNDS[0] <= float(v.min()) and float(v.max()) <= BOUNDS[1] for v in last.values())
    # continued from its last coefficients, it starts where it stopped
    again = ref.run(start, steps=1, every=1, lr=0.05, coefficients=last)
    assert again[0][2] == pytest.approx(losses[-1], rel=1e-5)
