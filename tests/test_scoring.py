"""Scorer: lm-eval's own numbers, fixed seeded subsets, live weights seen, clear task errors."""

from __future__ import annotations

import pytest

from evomerge.errors import TaskError
from evomerge.scoring import BUILTIN_TASKS, Scorer, TaskSpec, load_model_dir

TASKS = [TaskSpec(name="zoo_add_search", subset=40), TaskSpec(name="zoo_reverse_greedy_search", subset=30)]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(TASKS, seed=3)


@pytest.fixture(scope="module")
def base(tiny_zoo):
    return load_model_dir(tiny_zoo / "base")


def test_scores_equal_simple_evaluate(scorer, base, monkeypatch):
    """Same model, tasks and examples through lm-eval's public entry point, run where the YAMLs live."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = base
    ours = scorer.score(model, tokenizer)
    monkeypatch.chdir(BUILTIN_TASKS / "zoo")  # lm-eval reads relative data_files from the working directory
    ref = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=scorer.batch_size),
        tasks=[t.name for t in TASKS],
        task_manager=TaskManager(include_path=str(BUILTIN_TASKS), include_defaults=False),
        samples=scorer.subsets,
        bootstrap_iters=0,
        log_samples=False,
    )
    for t in TASKS:
        assert ref["n-samples"][t.name]["effective"] == t.subset
        expected = {
            k.split(",")[0]: v for k, v in ref["results"][t.name].items() if k.endswith(",none") and "stderr" not in k
        }
        assert ours[t.name] == expected
    assert set(ours["zoo_add_search"]) == {"acc", "acc_norm"}
    assert set(ours["zoo_reverse_greedy_search"]) == {"acc", "perplexity"}


def test_subsets_fixed_seeded_and_sized(scorer):
    again = Scorer(TASKS, seed=3).subsets
    other = Scorer(TASKS, seed=4).subsets
    assert again == scorer.subsets
    assert other["zoo_add_search"] != scorer.subsets["zoo_add_search"]
    for t in TASKS:
        idx = scorer.subsets[t.name]
        assert len(idx) == len(set(idx)) == t.subset and idx == sorted(idx)
        assert 0 <= idx[0] and idx[-1] < len(scorer.tasks[t.name].eval_docs)
        assert idx != list(range(t.subset)), "a seeded sample, not the first N (`limit`)"
    # a task's subset depends on its name and the seed only, not on the other tasks listed
    alone = Scorer([TASKS[1]], seed=3).subsets
    assert alone["zoo_reverse_greedy_search"] == scorer.subsets["zoo_reverse_greedy_search"]
    assert "zoo_add" not in Scorer(["zoo_add"]).subsets  # no subset: every example


def test_in_place_weight_changes_are_scored(scorer, tiny_zoo):
    import torch

    model, tokenizer = load_model_dir(tiny_zoo / "reverse")
    first = scorer.score(model, tokenizer)
    assert scorer.score(model, tokenizer) == first  # no state carried between calls
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    changed = scorer.score(model, tokenizer)
    assert changed != first
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(saved[k])
    assert scorer.score(model, tokenizer) == first


def test_objective_is_the_weighted_mean(scorer):
    specs = [
        TaskSpec(name="zoo_add_search", weight=3.0),
        TaskSpec(name="zoo_reverse_greedy_search", metric="perplexity"),
    ]
    s = Scorer(specs)
    scores = {
        "zoo_add_search": {"acc": 0.5, "acc_norm": 0.1},
        "zoo_reverse_greedy_search": {"acc": 0.0, "perplexity": 4.0},
    }
    assert s.objective(scores) == pytest.approx((3 * 0.5 + 1 * 0.25) / 4)
    tag = Scorer([TaskSpec(name="zoo_greedy_val", metric="acc")])
    from evomerge.zoo.skills import SKILLS

    assert sorted(tag.members["zoo_greedy_val"]) == sorted(f"zoo_{name}_greedy_val" for name in SKILLS)
    numbers = (0.1, 0.2, 0.3, 0.6, 0.3, 0.0, 0.9, 0.4, 0.2)[: len(SKILLS)]
    values = dict(zip(tag.members["zoo_greedy_val"], numbers))
    assert tag.objective({k: {"acc": v} for k, v in values.items()}) == pytest.approx(sum(numbers) / len(numbers))


def test_unknown_task_suggests_close_names():
    with pytest.raises(TaskError, match=r"unknown task 'zoo_ad'.*did you mean: zoo_add"):
        Scorer(["zoo_ad"])


def test_unknown_metric_names_valid_ones():
    with pytest.raises(TaskError, match=r"zoo_add has no metric 'f1'; valid: acc, acc_norm"):
        Scorer([TaskSpec(name="zoo_add", metric="f1")])


def test_bad_subset_and_duplicates():
    with pytest.raises(TaskError, match="fewer than subset 201"):
        Scorer([TaskSpec(name="zoo_add_search", subset=201)])
    with pytest.raises(TaskError, match="zoo_add is listed twice"):
        Scorer(["zoo", "zoo_add"])
    with pytest.raises(ValueError):
        TaskSpec(name="zoo_add", subset=0)


def _generation_task(folder, name: str, data) -> TaskSpec:
    """A generate_until task over `data` (prompt, answer), scored by exact match, with a bound far above its answers."""
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\ndoc_to_text: prompt\ndoc_to_target: answer\noutput_type: generate_until\n"
        "generation_kwargs:\n  until: ['<eos>']\n  max_gen_toks: 40\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return TaskSpec(name=name, metric="exact_match", subset=60)


def _own_answers(folder, model, tokenizer) -> TaskSpec:
    """zoo add's prompts, every other one answered by what `model` generates for it: exact matches guaranteed."""
    import json

    source = BUILTIN_TASKS / "zoo" / "data" / "add_search.jsonl"
    spec = _generation_task(folder, "gen_own", source)
    full = Scorer([spec], [folder], seed=1, answer_cap=False)
    out = full._evaluate(model, tokenizer, None, log_samples=True)["samples"]["gen_own"]
    said = {int(r["doc_id"]): r["filtered_resps"][0] for r in out}
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows = [{**r, "answer": said[i]} if i % 2 == 0 else r for i, r in enumerate(rows)]
    (folder / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _generation_task(folder, "gen_own", folder / "own.jsonl")


def test_generation_cut_at_the_longest_answer_scores_the_same(tiny_zoo, tmp_path):
    """Generation stops at the longest reference answer plus a margin instead of the task's max_gen_toks: every
    example's exact match is the same as with lm-eval's own bound, for models that answer and one that never
    stops, and fewer tokens are generated."""
    import torch

    data = BUILTIN_TASKS / "zoo" / "data"
    specs = [_generation_task(tmp_path, f"gen_{n}", data / f"{n}_search.jsonl") for n in ("add", "reverse")]
    specs.append(_own_answers(tmp_path, *load_model_dir(tiny_zoo / "add")))
    cut, full = Scorer(specs, [tmp_path], seed=1), Scorer(specs, [tmp_path], seed=1, answer_cap=False)
    generated = {}
    for member in ("base", "add", "reverse", "endless"):
        model, tokenizer = load_model_dir(tiny_zoo / member.replace("endless", "add"))
        if member == "endless":  # the add specialist, its end-of-sequence logit -inf: it never stops by itself
            eos = tokenizer.eos_token_id
            model.lm_head.register_forward_hook(lambda _m, _i, out: out.index_fill_(-1, torch.tensor([eos]), -1e9))
        calls = []
        inner = model.forward
        model.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
        for label, scorer in (("cut", cut), ("full", full)):
            before = len(calls)
            generated[member, label] = scorer.score_examples(model, tokenizer)[1], len(calls) - before
        assert generated[member, "cut"][0] == generated[member, "full"][0]  # {task: {example: exact match}}
        assert generated[member, "cut"][1] <= generated[member, "full"][1]  # forward passes
    bounds = {leaf: cut.tasks[leaf].get_config("generation_kwargs")["max_gen_toks"] for leaf in cut.tasks}
    assert all(b < 40 for b in bounds.values()) and full.gen_bounds == dict.fromkeys(bounds, 40)
    assert generated["endless", "cut"][1] < generated["endless", "full"][1]
    assert sum(generated["add", "cut"][0]["gen_own"].values()) >= 25  # its own answers (every other example) match
