"""Recipe: YAML round trip, path resolution, input order, validation errors that name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.recipe import ConditionalParameter, Recipe

FULL = """\
merge_method: ties
base_model: /models/base
models:
- model: /models/add
  parameters:
    weight: [0.2, 0.8, 0.5]
    density:
    - filter: self_attn
      value: 0.3
    - filter: mlp
      value: [0.4, 0.9]
    - value: 0.7
- model: /models/reverse
  parameters:
    weight: 1
    density: 1.0e-05
parameters:
  normalize: true
  lambda: 1.25
  int8_mask: false
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
chat_template: chatml
evomerge:
  seed: 7
  version: 0.1.0
  inputs:
    /models/add: aaaa
    /models/base: bbbb
  outputs:
    model.safetensors: cccc
    config.json: dddd
  study: demo
  trial: 12
  scores:
    add: 0.75
    reverse: 0.5
  extra:
    heldout: {add: 0.7}
    started: '2025-01-01T00:00:00'
"""


def test_round_trip_loses_nothing():
    recipe = Recipe.from_yaml(FULL)
    text = recipe.to_yaml()
    again = Recipe.from_yaml(text)
    assert again == recipe
    assert again.to_yaml() == text
    assert yaml.safe_load(text) == yaml.safe_load(FULL)
    # types survive: int stays int, tiny floats stay floats, conditionals stay conditionals
    add, rev = recipe.models
    assert rev.parameters["weight"] == 1 and isinstance(rev.parameters["weight"], int)
    assert rev.parameters["density"] == 1e-05
    assert isinstance(add.parameters["density"][0], ConditionalParameter)
    assert add.parameters["density"][1].value == [0.4, 0.9]
    assert recipe.evomerge.extra["heldout"] == {"add": 0.7}
    assert recipe.seed == 7


def test_mergekit_accepts_our_yaml():
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate(yaml.safe_load(Recipe.from_yaml(FULL).to_yaml()))
    assert cfg.merge_method == "ties"
    assert str(cfg.models[0].model) == "/models/add"
    assert cfg.models[0].parameters["weight"] == [0.2, 0.8, 0.5]


def test_load_resolves_relative_paths_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(
        "merge_method: linear\nmodels:\n- model: ../zoo/add\n  parameters: {weight: 1}\n- model: /abs/rev\n"
        "  parameters: {weight: 2}\nevomerge: {inputs: {../zoo/add: abc}}\n"
    )
    recipe = Recipe.load(path)
    assert recipe.input_models() == [str(tmp_path / "zoo" / "add"), "/abs/rev"]
    assert recipe.evomerge.inputs == {str(tmp_path / "zoo" / "add"): "abc"}
    # from_yaml without base_dir keeps paths as written
    assert Recipe.from_yaml(path.read_text()).models[0].model == "../zoo/add"


def test_input_order_is_mergekits():
    r = Recipe.from_yaml(
        "merge_method: task_arithmetic\nbase_model: b\nparameters: {weight: 1}\nmodels: [{model: x}, {model: y}]"
    )
    assert r.input_models() == ["x", "y", "b"]
    r = Recipe.from_yaml(
        "merge_method: task_arithmetic\nbase_model: x\nparameters: {weight: 1}\nmodels: [{model: y}, {model: x}]"
    )
    assert r.input_models() == ["y", "x"]


def test_with_provenance_and_dump_is_atomic(tmp_path):
    r = Recipe.from_yaml(FULL).with_provenance(seed=3, scores={"x": 1.0})
    assert r.seed == 3 and r.evomerge.study == "demo" and r.evomerge.scores == {"x": 1.0}
    plain = Recipe.from_yaml("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]")
    assert plain.seed == 0 and plain.evomerge is None
    assert plain.with_provenance(seed=5).seed == 5
    out = tmp_path / "deep" / "recipe.yaml"
    r.dump(out)
    assert Recipe.load(out) == r
    assert [p.name for p in out.parent.iterdir()] == ["recipe.yaml"]  # no temp file left behind


BAD = [
    ("merge_method: tiess\nmodels: [{model: a}]", ["merge_method", "did you mean: ties", "valid: linear"]),
    (
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, densty: 0.5}}]",
        ["models[0].parameters.densty", "did you mean: density"],
    ),
    (
        "merge_method: ties\nbase_model: b\nparameters: {weight: 1, density: 0}\nmodels: [{model: a}]",
        ["parameters.density", "(0, 1]"],
    ),
    (
        "merge_method: ties\nbase_model: b\nparameters: {weight: 1, density: [0.5, 1.5]}\nmodels: [{model: a}]",
        ["density", "1.5"],
    ),
    (
        "merge_method: dare_ties\nbase_model: b\nparameters: "
        "{weight: 1, density: [{filter: mlp, value: -0.1}, {value: 0.5}]}\n"
        "models: [{model: a}]",
        ["density", "-0.1"],
    ),
    ("merge_method: slerp\nbase_model: b\nparameters: {t: 1.2}\nmodels: [{model: a}]", ["parameters.t", "[0, 1]"]),
    ("merge_method: linear\nparameters: {weight: .nan}\nmodels: [{model: a}]", ["weight", "finite"]),
    ("merge_method: linear\nparameters: {weight: abc}\nmodels: [{model: a}]", ["weight", "'abc'"]),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]", ["weight", "requires"]),
    (
        "merge_method: slerp\nparameters: {t: 0.5}\nmodels: [{model: a}, {model: c}]",
        ["field base_model", "needs a base"],
    ),
    (
        "merge_method: della\nbase_model: b\nparameters: {weight: 1, density: 0.9, epsilon: 0.2}\nmodels: [{model: a}]",
        ["epsilon"],
    ),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: float8", ["dtype", "float32"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nbogus: 1", ["bogus", "unknown field"]),
    (
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nout_dtyp: float16",
        ["out_dtyp", "did you mean: out_dtype"],
    ),
    (
        "merge_method: linear\nmodels: [{model: a, paramters: {weight: 1}}]",
        ["models.0.paramters", "did you mean: parameters"],
    ),
    (
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nevomerge: {sed: 1}",
        ["evomerge.sed", "did you mean: seed"],
    ),
    ("merge_method: linear\nslices: []", ["slices", "models:"]),
    ("merge_method: linear", ["models"]),
    ("merge_method: [linear\n", ["not valid YAML", "line"]),
    ("- a\n- b\n", ["mapping"]),
]


@pytest.mark.parametrize("text,needles", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recipes_name_file_and_field(tmp_path, text, needles):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Recipe.load(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Recipe.load(tmp_path / "nope.yaml")


def test_nan_literal_is_rejected_not_silently_kept():
    with pytest.raises(ConfigError, match="finite"):
        Recipe.from_yaml("merge_method: linear\nmodels: [{model: a, parameters: {weight: .inf}}]")
    with pytest.raises(ConfigError, match="finite"):
        Recipe.from_yaml("merge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]")
    # YAML 1.1 reads `1e3` as the string "1e3": the recipe keeps it as written (so it dumps back the same, as
    # mergekit's own config does), and the merge reads it as the number 1000, as mergekit's resolver does
    from evomerge.merge.plan import Plan

    r = Recipe.from_yaml("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e3}}]")
    assert r.models[0].parameters["weight"] == "1e3"
    assert Plan(r, num_layers=2).resolve("model.layers.0.mlp.up_proj.weight").per_input["a"]["weight"] == 1000.0


def test_example_paths_are_plain_strings():
    r = Recipe.from_yaml("merge_method: passthrough\nmodels: [{model: ~/m}]", base_dir=Path("/x"))
    assert r.models[0].model == str(Path("~/m").expanduser())
