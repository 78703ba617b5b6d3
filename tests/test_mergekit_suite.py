"""mergekit's own test suite through `evomerge merge`: its configurations merged by mergekit 0.1.5 and by evomerge.

    .venv/bin/python -m pytest -q tests/test_mergekit_suite.py                 # one case per family (CI)
    .venv/bin/python -m pytest -q -s -m slow tests/test_mergekit_suite.py      # every configuration, with a count

The configurations are mergekit's (tests/*.py in arcee-ai/mergekit, those mergekit 0.1.5 accepts), written out in
tests/data/mergekit_suite/cases.yaml; the tiny models are rebuilt as its fixtures build them (tests/mergekit_suite.py).
The cases below run mergekit in this process (`mergekit.merge.run_merge` with `--random-seed 0`'s options: what
`mergekit-yaml` runs once it has parsed its flags) and `evomerge merge` through its CLI entry point; the slow sweep
runs both command lines. Each family's case failed before evomerge honoured the recipe field it exercises.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.mergekit_suite import build_models, compare_outputs, load_cases, outcome, recipe_models, run_case

CASES = load_cases()
FAMILIES = {  # one case per configuration family the suite found evomerge short on
    "chat_template": "chat_template_chatml",
    "unused_parameter": "slerp",
    "config_dtype": "arcee_fusion",
    "tokenizer_block": "tokenizer_force_token",
    "truncation": "truncation_linear",
    "random_mask": "dare_ties",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    names = set().union(*(recipe_models(CASES[c].recipe) for c in FAMILIES.values()))
    return build_models(tmp_path_factory.mktemp("mergekit_models"), sorted(names))


def mergekit_merge(case, models: Path, out: Path, monkeypatch) -> None:
    """mergekit-yaml's merge of the case, in this process (relative model names resolve against `models`)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    monkeypatch.chdir(models)
    options = MergeOptions(
        random_seed=0,
        write_model_card=False,
        quiet=True,
        unsafe_truncate_embeddings="--unsafe-truncate-embeddings" in case.mergekit_flags,
    )
    run_merge(MergeConfiguration.model_validate(case.recipe), str(out), options=options)


def evomerge_merge(case, models: Path, out: Path) -> int:
    from evomerge.cli import main

    recipe = models / f"{case.name}.yaml"
    recipe.write_text(yaml.safe_dump(case.recipe, sort_keys=False))
    return main(["merge", str(recipe), "--out", str(out), *case.evomerge_flags])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_merges_as_mergekit_does(family, models, tmp_path, monkeypatch, capsys):
    case = CASES[FAMILIES[family]]
    mergekit_merge(case, models, tmp_path / "mergekit", monkeypatch)
    assert evomerge_merge(case, models, tmp_path / "evomerge") == 0
    assert compare_outputs(tmp_path / "mergekit", tmp_path / "evomerge") == []
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge: warning:")]
    if family in ("unused_parameter", "config_dtype"):  # both carry mergekit's test helper's `weight` per model
        assert len(warnings) == 1 and "does not read 'weight'; ignored" in warnings[0], warnings
    if family == "truncation":
        assert any("--unsafe-truncate-embeddings: lm_head.weight to 8 of 10 rows" in w for w in warnings), warnings


def test_chat_template_is_the_named_one(models, tmp_path, monkeypatch):
    """The output's template is mergekit's chatml file, and a literal template is written as given."""
    from transformers import AutoTokenizer

    case = CASES["chat_template_chatml"]
    assert evomerge_merge(case, models, tmp_path / "chatml") == 0
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(str(tmp_path / "chatml")).chat_template
    literal = CASES["chat_template_literal_jinja"]
    assert evomerge_merge(literal, models, tmp_path / "literal") == 0
    template = AutoTokenizer.from_pretrained(str(tmp_path / "literal")).chat_template
    assert template == "{{messages[0]['content']}}"


@pytest.mark.slow
def test_every_configuration_of_mergekits_suite(tmp_path):
    """Every configuration merged by both tools (in this process: what `mergekit-yaml --random-seed 0` and `evomerge
    merge` run once their flags are parsed; 2-3 s a case), each ending as cases.yaml expects; the count is printed
    (`-s`). mergekit numbers a union's main-vocabulary tokens in its hash map's order, so that case may also come
    out equal."""
    models = tmp_path / "models"
    seen = {}
    for case in CASES.values():
        build_models(models, sorted(recipe_models(case.recipe)))
        result = run_case(case, models, tmp_path / "out" / case.name, in_process=True)
        seen[case.name] = outcome(case, result, tmp_path / "out" / case.name)
    equal = [n for n, o in seen.items() if o == "equal"]
    print(f"\n{len(seen)} configurations: {len(equal)} equal")
    for name, found in seen.items():
        if found != "equal":
            print(f"  {name}: {found} ({CASES[name].reason})")
    wrong = {n: o for n, o in seen.items() if o != CASES[n].expect and CASES[n].expect != "union_numbered_otherwise"}
    assert not wrong, wrong
    assert seen["phi_union_phi_swapped10"] in ("equal", "union_numbered_otherwise")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_command_lines_give_what_the_fast_cases_compare(family, models, tmp_path):
    """`mergekit-yaml CASE.yaml OUT --random-seed 0` and `evomerge merge CASE.yaml --out OUT`, as users run them."""
    case = CASES[FAMILIES[family]]
    result = run_case(case, models, tmp_path)
    assert result.equal, (result.differences, result.evomerge_stderr[-500:], result.mergekit_stderr[-500:])
