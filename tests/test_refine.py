"""Gradient refinement: the surrogate is the real merge at its starting point; its gradient, computed within the
resident model's memory (one backward pass, inner products with streamed task vectors), is the autograd
gradient of the old engine (tests/refine_reference.py) on two zoos; its steps lower the loss inside the bounds,
and a search turns the path into trials scored like any other."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from refine_reference import AutogradRefiner

from evomerge.candidate.evaluator import Evaluator
from evomerge.candidate.space import SearchSpace, load_space_spec, num_layers
from evomerge.config.schema import parse_config
from evomerge.errors import ConfigError
from evomerge.refine.descent import BALANCE_LIMIT, balanced, task_scales
from evomerge.refine.losses import answer_loss, micro_batches
from evomerge.refine.tensor import Refiner
from evomerge.scoring.tasks import TaskSpec
from evomerge.study.storage import load_study
from evomerge.study.trials import objective_of

SEARCH = [TaskSpec(name="zoo_add_greedy_search", subset=16), TaskSpec(name="zoo_reverse_search", subset=16)]
SPACES = {"dare_linear": "dare_ties", "della_linear": "della", "breadcrumbs_ties": "ties"}


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return Evaluator([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH})


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A second zoo: three specialists of another shape (3 layers, hidden 48, 3 heads), briefly trained, and its
    evaluator (a multiple-choice task with 3 choices besides the others)."""
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.train import ModelShape
    from evomerge.zoo.variants import Specialist, ZooVariant

    variant = ZooVariant(
        "trio-test",
        "three specialists, another shape",
        (Specialist("reverse", steps=30), Specialist("dup", steps=30), Specialist("add", steps=30)),
        shape=ModelShape(hidden=48, layers=3, heads=3, intermediate=96),
        base_steps=60,
        batch=16,
    )
    zoo = tmp_path_factory.mktemp("zoo") / "trio"
    build_zoo(zoo, seed=0, variant=variant, log=None)
    tasks = [*SEARCH, TaskSpec(name="zoo_dup_search", subset=8)]
    models = [zoo / m for m in ("reverse", "dup", "add")]
    return zoo, Evaluator(models, zoo / "base", {"search": tasks}), [str(m) for m in models]


def refiner(zoo, evaluator, method: str, models=None, engine=Refiner, **kw) -> tuple[Refiner, SearchSpace, list[str]]:
    space = SearchSpace(load_space_spec(SPACES.get(method, method)), num_layers(zoo / "base"))
    models = models or [str(zoo / "add"), str(zoo / "reverse")]
    scorer = evaluator.scorer("search")
    return engine(evaluator.materializer, scorer, space, models, str(zoo / "base"), method, **kw), space, models


def inside(space, models) -> dict[str, float]:
    """A point away from the defaults: eighths of each range (exact in the 4 digits a recipe keeps)."""
    return {
        name: ps.low + (i % 5 + 1) / 8 * (ps.high - ps.low) for i, (name, ps) in enumerate(space.bounds(models).items())
    }


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "tsv_m"])
def test_the_surrogate_at_its_start_is_the_merge(tiny_zoo, evaluator, method):
    ref, space, models = refiner(tiny_zoo, evaluator, method)
    point = inside(space, models)
    ref.write(point)  # into the resident model
    surrogate = {name: t.clone() for name, t in evaluator.materializer.targets.items()}
    evaluator.load(space.to_recipe(point, models, str(tiny_zoo / "base"), method, seed=0))
    merged = evaluator.materializer.targets
    for name, tensor in surrogate.items():
        if method == "task_arithmetic":
            torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6)
        elif method == "tsv_m":  # sum_i w_i A_i against one product U diag(w s) V^T: float32 rounding apart
            torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-5)
        else:  # TIES prunes by magnitude: the surrogate may keep another element only where magnitudes tie
            close = torch.isclose(tensor, merged[name], rtol=1e-5, atol=1e-6).float().mean().item()
            assert close > 0.995, f"{name}: only {close:.4f} of the elements agree"
            # evomerge-1's masks, the merge's own (same densities, same seed): every element agrees
            torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6)


CASES = [("tiny", m) for m in ("task_arithmetic", "ties", "dare_ties")]
CASES += [("trio", m) for m in ("task_arithmetic", "ties", "della", "breadcrumbs_ties")]


@pytest.mark.parametrize("zoo,method", CASES)
def test_the_gradient_is_the_autograd_surrogates(tiny_zoo, evaluator, trio, zoo, method):
    """The chunked inner products of the resident model's gradient with the task vectors give the gradient
    autograd finds through the merge formula (derivatives of TIES' elected, normalised sum included)."""
    root, ev, models = (tiny_zoo, evaluator, None) if zoo == "tiny" else trio
    new, space, models = refiner(root, ev, method, models)
    old, _, _ = refiner(root, ev, method, models, engine=AutogradRefiner)
    point = inside(space, models)
    new.prepare(space.defaults(models))  # its affine map, found at another point, serves this one too
    loss, grad = new.gradient(point)
    ref_loss, ref_grad = old.gradient(point)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    a, b = (torch.tensor([g[k] for k in ref_grad], dtype=torch.float64) for g in (grad, ref_grad))
    scale = b.abs().max().item()
    assert scale > 1e-3 and len(b) >= 3  # not a vacuous equality
    # measured: max |a - b| / max |b| <= 2.6e-6 over these cases (float32 sums in another order)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * scale)


def test_micro_batches_add_up_to_one_batch(tiny_zoo, evaluator):
    ref, space, models = refiner(tiny_zoo, evaluator, "ties")
    small = ref.batches(24)
    assert len(small) > 5
    assert sorted(id(i) for b in small for i in b.items) == sorted(id(i) for i in ref.items)  # each item once
    for b in small:
        assert b.rows == sum(len(i.continuations) for i in b.items)  # an item's choices together
        assert b.rows * b.ids.shape[1] <= 24 or len(b.items) == 1
        assert b.target.shape == (b.rows, b.keep) and (b.target != -100).any(1).all()
    point = inside(space, models)
    loss, grad = ref.gradient(point, micro_batch_tokens=24)
    whole_loss, whole = ref.gradient(point, micro_batch_tokens=10**6)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for k in whole:
        assert grad[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-7)


def test_the_loss_is_pluggable(tiny_zoo, evaluator):
    ref, space, models = refiner(tiny_zoo, evaluator, "task_arithmetic")
    double, _, _ = refiner(tiny_zoo, evaluator, "task_arithmetic", loss=lambda logits, b: 2 * answer_loss(logits, b))
    point = inside(space, models)
    (loss, grad), (loss2, grad2) = ref.gradient(point), double.gradient(point)
    assert loss2 == pytest.approx(2 * loss, rel=1e-6)
    assert all(grad2[k] == pytest.approx(2 * grad[k], rel=1e-5, abs=1e-9) for k in grad)


def test_the_refined_path_is_the_old_engines(tiny_zoo, evaluator):
    new, space, models = refiner(tiny_zoo, evaluator, "ties", balance=False)  # the old engine weighs tasks as given
    old, _, _ = refiner(tiny_zoo, evaluator, "ties", engine=AutogradRefiner, balance=False)
    start = space.defaults(models)
    flags = [p.requires_grad for p in evaluator.materializer.model.parameters()]
    path, ref_path = new.run(start, steps=6, every=2), old.run(start, steps=6, every=2)
    bounds = space.bounds(models)
    assert [s for s, _, _ in path] == [s for s, _, _ in ref_path] == [0, 2, 4, 6]
    for (_, point, loss), (_, ref_point, ref_loss) in zip(path, ref_path):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        # measured: 1.3e-5 of a range at most (Adam on gradients equal to ~1e-6)
        assert max(abs(point[k] - ref_point[k]) / (bounds[k].high - bounds[k].low) for k in point) < 1e-3
    assert path[-1][1] != start
    model = evaluator.materializer.model
    assert all(p.grad is None for p in model.parameters())  # the gradients' memory is given back
    assert [p.requires_grad for p in model.parameters()] == flags


def test_refine_lowers_the_surrogate_loss_inside_the_bounds(tiny_zoo, evaluator):
    ref, space, models = refiner(tiny_zoo, evaluator, "task_arithmetic")
    start = space.defaults(models)
    path = ref.run(start, steps=12, every=4, lr=0.05)
    assert [step for step, _, _ in path] == [0, 4, 8, 12]
    assert path[0][1] == start
    losses = [loss for _, _, loss in path]
    assert losses[-1] < losses[0]
    bounds = space.bounds(models)
    for _, point, _ in path:
        assert set(point) == set(bounds)
        assert all(bounds[k].low <= v <= bounds[k].high for k, v in point.items())
    assert path[-1][1] != start


def search_config(zoo, **changes):
    data = {
        "name": "refine",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "tasks": {"search": [t.model_dump() for t in SEARCH]},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 10},
        "workers": {"count": 0},
        "portfolio": False,
        "refine": {"at": [0.4], "steps": 6, "every": 2},
        **changes,
    }
    return parse_config(data)


def test_a_search_scores_the_refine_path_as_trials(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    cfg = search_config(tiny_zoo)
    result = run_search(cfg, progress=False, log=None)
    assert result.n_complete == 10
    study = load_study(cfg.name, cfg.storage_url)
    refined = [t for t in study.trials if "refine_round" in t.user_attrs]
    assert [t.user_attrs["refine_step"] for t in refined] == [2, 4, 6]  # step 0 is the trial it started from
    assert all(t.state.name == "COMPLETE" and t.user_attrs["recipe"] for t in refined)
    start = study.trials[refined[0].user_attrs["refined_from"]]
    assert start.number < refined[0].number and start.state.name == "COMPLETE"
    before = [t for t in study.trials if t.number < refined[0].number and t.state.name == "COMPLETE"]
    assert objective_of(start) == max(objective_of(t) for t in before)  # from the best trial so far
    assert len(before) == 4  # the round starts at 0.4 of the budget


def test_refine_asked_for_on_a_method_without_a_weight_gradient_is_a_user_error(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.config.resolve import check_tasks

    monkeypatch.chdir(tmp_path)
    models = {"models": [str(tiny_zoo / "add")], "method": "slerp", "search_space": "slerp"}
    with pytest.raises(ConfigError, match="refine: method 'slerp' has no weight gradient"):
        check_tasks(search_config(tiny_zoo, **models))
    quietly_off = parse_config({**search_config(tiny_zoo, **models).model_dump(mode="json", exclude={"refine"})})
    assert "refine" not in quietly_off.model_fields_set and quietly_off.refine is not None
    assert "no weight gradient" in check_tasks(quietly_off)["refine"]  # the default refinement: off, with the reason


@pytest.mark.parametrize("zoo", ["tiny", "trio"])
def test_token_bytes_is_what_the_backward_keeps(tiny_zoo, evaluator, trio, zoo):
    """The resource plan's activation term (refine_extra_bytes): the tensors autograd saves for the backward of
    one micro-batch, counted by storage (parameters apart), per position."""
    from evomerge.refine.footprint import token_bytes
    from evomerge.refine.losses import logits_of as _logits

    root, ev, models = (tiny_zoo, evaluator, None) if zoo == "tiny" else trio
    ref, _, _ = refiner(root, ev, "task_arithmetic", models)
    model = ev.materializer.model
    batch = max(ref.batches(), key=lambda b: b.ids.numel())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    flags = [p.requires_grad_(True) for p in model.parameters()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            _logits(model, batch, "cpu")
    finally:
        for p in flags:
            p.requires_grad_(False)
    predicted = token_bytes(model.config.to_dict(), 4) * batch.ids.numel()
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.1)  # measured: 4.0% (tiny), 2.6% (trio) over


@pytest.mark.parametrize("arch,method", [("gemma", "task_arithmetic"), ("gpt2", "ties")])
def test_the_gradient_on_tied_embeddings(arch_family, arch, method):
    """A head tied to the embeddings (one parameter, no lm_head stored: gemma; GPT-2's Conv1D layers): its
    gradient sums both uses, and the inner products see it once."""
    family = arch_family(arch)
    models = [str(family["a"]), str(family["b"])]
    ev = Evaluator(models, family["base"], {"search": SEARCH})
    space = SearchSpace.over(load_space_spec(method), family["base"])
    args = (ev.materializer, ev.scorer("search"), space, models, str(family["base"]), method)
    point = inside(space, models)
    (loss, grad), (ref_loss, ref_grad) = Refiner(*args).gradient(point), AutogradRefiner(*args).gradient(point)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    a, b = (torch.tensor([g[k] for k in ref_grad], dtype=torch.float64) for g in (grad, ref_grad))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * b.abs().max().item())  # measured: <= 4.2e-6 of max


def test_a_large_model_refines_on_fewer_examples(tiny_zoo, evaluator):
    """refine_examples: the toy zoos' steps train on the whole search subsets (None: nothing changes for them, at
    the demo's 100 examples per task too); where parameters x positions pass the budget, a share of the subsets, at
    least MIN_REFINE_EXAMPLES, and the refiner then trains on that many items per task."""
    from evomerge.refine.footprint import MIN_REFINE_EXAMPLES, refine_examples

    demo = Evaluator(
        [tiny_zoo / "add", tiny_zoo / "reverse"],
        tiny_zoo / "base",
        {"search": [TaskSpec(name=t.name, subset=100) for t in SEARCH]},
    )
    assert refine_examples(demo.materializer, demo.scorer("search")) is None
    scorer = evaluator.scorer("search")
    assert refine_examples(evaluator.materializer, scorer) is None
    assert refine_examples(evaluator.materializer, scorer, budget=1) == MIN_REFINE_EXAMPLES
    few = refine_examples(demo.materializer, demo.scorer("search"), budget=5 * 10**7)
    assert MIN_REFINE_EXAMPLES < few < 100
    small, _, _ = refiner(tiny_zoo, demo, "task_arithmetic", examples=few)
    whole, _, _ = refiner(tiny_zoo, demo, "task_arithmetic")
    assert len(small.items) == 2 * few and len(whole.items) == 200


def test_task_scales_equalise_the_gradients_up_to_the_limit():
    grads = {"steep": torch.tensor([3.0, 4.0]), "flat": torch.tensor([1.0, 0.0]), "done": torch.zeros(2)}
    scales = task_scales({t: [t] for t in grads}, lambda batches: grads[batches[0]])
    assert scales == {"steep": 1.0, "flat": 5.0, "done": BALANCE_LIMIT}
    far = task_scales({"a": ["a"], "b": ["b"]}, lambda b: torch.tensor([1.0]) if b == ["a"] else torch.tensor([1e4]))
    assert far == {"a": BALANCE_LIMIT, "b": 1.0}


def test_a_balanced_round_weighs_each_task_by_its_scale(tiny_zoo, evaluator):
    """The balanced batches' loss is the tasks' losses weighted by share x scale: its gradient is that sum of the
    tasks' own gradients, and each task's part of it is as large as the steepest task's."""
    ref, space, models = refiner(tiny_zoo, evaluator, "task_arithmetic")
    point = inside(space, models)
    items = list(ref.items)
    tasks = sorted({i.task for i in items})
    assert len(tasks) >= 2

    def gradient(chosen) -> torch.Tensor:
        ref.items, ref._batches = list(chosen), {}
        _, g = ref.gradient(point)
        return torch.tensor(list(g.values()))

    own = {t: gradient([i for i in items if i.task == t]) for t in tasks}
    batch = lambda chosen: micro_batches(chosen, ref._pad, ref._max_length, ref.micro_batch_tokens)  # noqa: E731
    scales = task_scales({t: [t] for t in tasks}, lambda b: own[b[0]])
    batches = balanced(items, batch, lambda b: own[b[0].items[0].task])
    weight = {t: sum(i.weight for b in batches for i in b.items if i.task == t) for t in tasks}
    total = batches[0].total_weight
    assert total == pytest.approx(sum(weight.values()))
    share = {t: sum(i.weight for i in items if i.task == t) for t in tasks}
    for t in tasks:  # each task's items carry its share times its scale
        assert weight[t] / share[t] == pytest.approx(scales[t] * weight[tasks[0]] / share[tasks[0]] / scales[tasks[0]])
    parts = {t: weight[t] / total * own[t] for t in tasks}
    norms = [float(p.norm()) for p in parts.values()]
    assert max(norms) / min(norms) == pytest.approx(1.0, rel=1e-6) or max(scales.values()) == BALANCE_LIMIT
    combined = gradient([replace(i, weight=i.weight * scales[i.task]) for i in items])
    assert torch.allclose(combined, sum(parts.values()), rtol=1e-4, atol=1e-7)
