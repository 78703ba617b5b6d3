"""The candidate evaluator: a model alone is its exact weights, task sets are scored by name, arbitrary states
load into the resident model, and failures are typed (the candidate's own, or a bug)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from evomerge.candidate.evaluator import Evaluator, alone, is_candidate_failure
from evomerge.errors import CandidateError, ConfigError, TaskCodeError
from evomerge.merge.recipe import Recipe
from evomerge.scoring import Scorer, TaskSpec, load_model_dir

SEARCH = [TaskSpec(name="zoo_add_search", subset=20), TaskSpec(name="zoo_reverse_search", subset=20)]
HELDOUT = [TaskSpec(name="zoo_add", subset=20)]


@pytest.fixture(scope="module")
def evaluator(tiny_zoo) -> Evaluator:
    return Evaluator(
        [tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH, "heldout": HELDOUT}
    )


def test_a_model_alone_is_its_exact_weights(evaluator, tiny_zoo):
    from safetensors.torch import load_file

    for name in ("base", "add", "reverse"):
        evaluator.load_model(tiny_zoo / name)
        weights = load_file(str(tiny_zoo / name / "model.safetensors"))
        state = evaluator.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items()), name  # bit-exact, not close
    recipe = alone(tiny_zoo / "add", evaluator.inputs)
    assert recipe.merge_method == "linear" and [e.parameters["weight"] for e in recipe.models] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not among the inputs"):
        alone(tiny_zoo / "elsewhere", evaluator.inputs)


def test_scores_a_named_task_set_as_the_scorer_scores_the_checkpoint(evaluator, tiny_zoo):
    result = evaluator.evaluate(alone(tiny_zoo / "reverse", evaluator.inputs).to_yaml(), "search")
    model, tokenizer = load_model_dir(tiny_zoo / "reverse")
    scorer = Scorer(SEARCH)
    direct = scorer.score(model, tokenizer)
    assert result.task_set == "search" and result.scores == direct
    assert result.objective == pytest.approx(scorer.objective(direct))
    assert result.metrics == {"zoo_add_search": "acc", "zoo_reverse_search": "acc"}
    assert result.values() == {t: direct[t]["acc"] for t in direct} == result.units
    assert result.merge_s > 0 and result.eval_s > 0 and result.non_finite() == []
    held = evaluator.score("heldout")  # the same resident weights, another task set
    assert set(held.scores) == {"zoo_add"}
    with pytest.raises(KeyError, match="no task set 'validation'"):
        evaluator.score("validation")


def test_load_weights_puts_an_arbitrary_state_into_the_resident_model(evaluator, tiny_zoo):
    evaluator.load_model(tiny_zoo / "add")
    before = evaluator.score("heldout")
    state = {k: torch.zeros_like(v) for k, v in evaluator.model.state_dict().items()}
    evaluator.load_weights(state)
    assert all(not v.any() for v in evaluator.model.state_dict().values())
    assert evaluator.score("heldout").scores != before.scores  # the scorer sees the loaded state
    with pytest.raises(KeyError, match="not in"):
        evaluator.load_weights({"no.such.tensor": torch.zeros(1)})


def test_failures_are_typed():
    assert is_candidate_failure(CandidateError("NaN"))
    assert is_candidate_failure(ConfigError("bad point"))  # every EvomergeError is the user's
    assert is_candidate_failure(TaskCodeError("boom"))
    assert is_candidate_failure(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_candidate_failure(ZeroDivisionError("a bug"))
    assert not is_candidate_failure(RuntimeError("a bug in lm-eval or torch"))


def raising_task(folder: Path, when: str) -> str:
    """A multiple-choice task whose `!function process_results` raises ValueError when `when` holds (it sees
    `calls`, how often it has run in this scorer, counting this call), else scores acc."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "boom.jsonl").write_text(
        "".join(
            f'{{"prompt": "{a}+1=", "choices": ["{a + 1}<eos>", "{a + 2}<eos>"], "label": 0}}\n'
            for a in range(100, 108)
        )
    )
    (folder / "boom_utils.py").write_text(
        textwrap.dedent(f"""\
        CALLS = [0]


        def process_results(doc, results):
            CALLS[0] += 1
            calls = CALLS[0]
            if {when}:
                raise ValueError("the user's task code failed on call %d" % calls)
            lls = [r[0] if isinstance(r, (tuple, list)) else r for r in results]
            return {{"acc": float(lls.index(max(lls)) == doc["label"])}}
        """)
    )
    (folder / "boom.yaml").write_text(
        textwrap.dedent("""\
        task: zoo_boom
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: boom.jsonl
        test_split: test
        output_type: multiple_choice
        doc_to_text: prompt
        doc_to_choice: choices
        doc_to_target: label
        target_delimiter: ""
        process_results: !function boom_utils.process_results
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """)
    )
    return "zoo_boom"


def test_an_exception_in_the_users_task_code_is_the_candidates_failure(tmp_path, tiny_zoo):
    folder = tmp_path / "tasks"
    name = raising_task(folder, "calls > 8")  # the first evaluation (8 documents) passes, the second raises
    ev = Evaluator([tiny_zoo / "add"], tiny_zoo / "base", {"boom": [TaskSpec(name=name)]}, [folder])
    assert 0.0 <= ev.evaluate(alone(tiny_zoo / "add", ev.inputs), "boom").objective <= 1.0
    with pytest.raises(TaskCodeError) as err:
        ev.score("boom")
    msg = str(err.value)
    assert str(folder / "boom_utils.py") in msg and "process_results" in msg and "ValueError" in msg and "\n" not in msg
    assert "on call 9" in msg and is_candidate_failure(err.value)


def test_a_bug_outside_the_task_code_is_not_the_candidates_failure(tmp_path, tiny_zoo, monkeypatch):
    """The same evaluation failing inside evomerge's own code (here: its lm-eval model wrapper) stays a bug."""
    from evomerge.scoring.lm import ResidentHFLM

    folder = tmp_path / "tasks"
    name = raising_task(folder, "False")
    ev = Evaluator([tiny_zoo / "add"], tiny_zoo / "base", {"boom": [TaskSpec(name=name)]}, [folder])

    def broken(self, _requests, **kwargs):
        raise ZeroDivisionError("a bug in evomerge")

    monkeypatch.setattr(ResidentHFLM, "loglikelihood", broken)
    with pytest.raises(ZeroDivisionError):
        ev.evaluate(
            Recipe(merge_method="linear", models=[{"model": m, "parameters": {"weight": 1.0}} for m in ev.inputs]),
            "boom",
        )
