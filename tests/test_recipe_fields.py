"""No field of a mergekit recipe is read and then dropped: each is honoured or refused by name.

mergekit's own pydantic models (`MergeConfiguration` and every model nested in it: InputModelDefinition,
InputSliceDefinition, OutputSliceDefinition, OutputModuleDefinition, TokenizerConfig, TokenEmbeddingConfig,
ModelTokenEmbedding, ZeroEmbedding, ConditionalParameter) are walked field by field, so a field a later mergekit adds
fails `test_every_mergekit_field_is_honoured_or_refused` until it is listed below. An honoured field survives into
the recipe evomerge merges and writes (`Recipe.to_dict`), and names the test that shows the merge uses it; a refused
one exits 2 with a line naming it.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe

TESTS = Path(__file__).parent

# field path (list and mapping levels left out) -> the test showing the merge honours it
HONOURED = {
    "merge_method": "test_merge_parity.py::test_export_equals_mergekit",
    "base_model": "test_merge_parity.py::test_export_equals_mergekit",
    "models": "test_merge_parity.py::test_export_equals_mergekit",
    "models.model": "test_merge_parity.py::test_export_equals_mergekit",
    "models.parameters": "test_merge_parity.py::test_export_equals_mergekit",
    "parameters": "test_merge_parity.py::test_export_equals_mergekit",
    "parameters.value": "test_merge_parity.py::test_export_equals_mergekit",  # {filter, value} conditionals
    "parameters.filter": "test_merge_parity.py::test_export_equals_mergekit",
    "models.parameters.value": "test_merge_parity.py::test_export_equals_mergekit",
    "models.parameters.filter": "test_merge_parity.py::test_export_equals_mergekit",
    "slices": "test_slices.py::test_per_layer_slices_equal_mergekit",
    "slices.sources": "test_slices.py::test_per_layer_slices_equal_mergekit",
    "slices.sources.model": "test_slices.py::test_per_layer_slices_equal_mergekit",
    "slices.sources.layer_range": "test_slices.py::test_layer_stacking_equals_mergekit_and_loads_with_its_new_depth",
    "slices.sources.parameters": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    "slices.sources.parameters.value": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    "slices.sources.parameters.filter": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    "slices.base_model": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    "slices.parameters": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    "slices.parameters.value": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    "slices.parameters.filter": "test_slices.py::test_slices_with_their_own_parameters_and_base_equal_mergekit",
    # mergekit 0.1.5 reads residual_weight and never uses it; evomerge keeps it in the recipe and ignores it too
    "slices.residual_weight": "test_recipe_fields.py::test_residual_weight_changes_nothing_as_in_mergekit",
    "dtype": "test_mergekit_suite.py::test_each_family_merges_as_mergekit_does",
    "out_dtype": "test_merge_parity.py::test_export_equals_mergekit",
    "tokenizer_source": "test_vocab.py::test_merge_equals_mergekit_tensors_and_tokenizer",
    "tokenizer": "test_mergekit_suite.py::test_each_family_merges_as_mergekit_does",
    "tokenizer.source": "test_mergekit_suite.py::test_each_family_merges_as_mergekit_does",
    "tokenizer.tokens": "test_mergekit_suite.py::test_each_family_merges_as_mergekit_does",
    "tokenizer.tokens.source": "test_mergekit_suite.py::test_each_family_merges_as_mergekit_does",
    "tokenizer.tokens.force": "test_mergekit_suite.py::test_each_family_merges_as_mergekit_does",
    "tokenizer.tokens.source.kind": "test_recipe_fields.py::test_token_sources_and_padding_equal_mergekit",
    "tokenizer.tokens.source.model": "test_recipe_fields.py::test_token_sources_and_padding_equal_mergekit",
    "tokenizer.tokens.source.token_id": "test_recipe_fields.py::test_token_sources_and_padding_equal_mergekit",
    "tokenizer.tokens.source.token": "test_recipe_fields.py::test_token_sources_and_padding_equal_mergekit",
    "tokenizer.pad_to_multiple_of": "test_recipe_fields.py::test_token_sources_and_padding_equal_mergekit",
    "chat_template": "test_mergekit_suite.py::test_chat_template_is_the_named_one",
}
# field path -> a recipe fragment using it, refused with a line naming the field
REFUSED = {
    "modules": {"modules": {"text": {"models": [{"model": "a"}]}}},
}
MODULE_FIELDS = "modules."  # every field inside the refused `modules`


def _models_in(annotation) -> list[type]:
    """The pydantic models an annotation names (through Optional, Union, List, Dict, Tuple, Literal)."""
    from mergekit.common import ModelReference
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [] if issubclass(annotation, ModelReference) else [annotation]  # a model reference is a string
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def mergekit_fields(model=None, prefix: str = "") -> set[str]:
    """Every field path of mergekit's recipe (`models.parameters.filter`, ...), its nested models walked."""
    from mergekit.config import MergeConfiguration

    model = model or MergeConfiguration
    out = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out.add(path)
        for nested in _models_in(info.annotation):
            out |= mergekit_fields(nested, f"{path}.")
    return out


def test_every_mergekit_field_is_honoured_or_refused():
    fields = mergekit_fields()
    assert "tokenizer.tokens.source.token_id" in fields and "slices.sources.layer_range" in fields  # the walk works
    unlisted = {f for f in fields - set(HONOURED) - set(REFUSED) if not f.startswith(MODULE_FIELDS)}
    assert not unlisted, f"mergekit fields neither honoured nor refused by evomerge: {sorted(unlisted)}"
    assert not (set(HONOURED) | set(REFUSED)) - fields, "listed fields mergekit no longer has"


@pytest.mark.parametrize("path", sorted(HONOURED))
def test_an_honoured_field_names_a_test_that_exists(path):
    file, name = HONOURED[path].split("::")
    assert f"def {name}(" in (TESTS / file).read_text()


def _paths(data, prefix: str = "") -> set[str]:
    """The field paths present in a recipe dict (list and mapping levels left out, as `mergekit_fields` does)."""
    out = set()
    if isinstance(data, list):
        for item in data:
            out |= _paths(item, prefix)
    elif isinstance(data, dict):
        for key, value in data.items():
            path = prefix.rstrip(".") if key not in FIELD_NAMES else f"{prefix}{key}"
            out.add(path)
            out |= _paths(value, f"{path}.")
    return {p for p in out if p}


FIELD_NAMES = {p.rsplit(".", 1)[-1] for p in HONOURED} | {"modules"}
GRADIENT = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]
MODELS_FORM = {
    "merge_method": "linear",
    "base_model": "a",
    "models": [{"model": "a", "parameters": {"weight": GRADIENT}}, {"model": "b", "parameters": {"weight": 1.0}}],
    "parameters": {"normalize": [{"filter": "mlp", "value": True}]},
    "dtype": "bfloat16",
    "out_dtype": "float32",
    "chat_template": "chatml",
    "tokenizer": {
        "source": "union",
        "tokens": {
            "<x>": {"source": "b", "force": True},
            "<y>": {"source": {"kind": "model_token", "model": "a", "token_id": 3}},
            "<z>": {"source": {"kind": "model_token", "model": "b", "token": "<s>"}},
            "<w>": {"source": {"kind": "zero"}},
        },
        "pad_to_multiple_of": 8,
    },
}
SLICES_FORM = {
    "merge_method": "ties",
    "base_model": "a",
    "slices": [
        {
            "sources": [
                {"model": "a", "layer_range": [0, 2]},
                {"model": "b", "layer_range": [0, 2], "parameters": {"density": GRADIENT, "weight": 1.0}},
            ],
            "base_model": "a",
            "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]},
            "residual_weight": 0.5,
        }
    ],
    "tokenizer_source": "base",
}


def test_every_honoured_field_reaches_the_recipe_evomerge_merges():
    kept = set()
    for data in (MODELS_FORM, SLICES_FORM):
        kept |= _paths(Recipe.from_dict(data).to_dict())
    assert set(HONOURED) - kept == set()


@pytest.mark.parametrize("path", sorted(REFUSED))
def test_a_refused_field_exits_naming_it(path):
    with pytest.raises(ConfigError, match=f"field '{path}'"):
        Recipe.from_dict({"merge_method": "linear", **REFUSED[path]}, source="r.yaml")


def test_residual_weight_changes_nothing_as_in_mergekit():
    """mergekit 0.1.5 declares residual_weight and never reads it (no code under mergekit/ uses it)."""
    import mergekit

    root = Path(mergekit.__file__).parent
    readers = [p for p in root.rglob("*.py") if "residual_weight" in p.read_text() and p.name != "config.py"]
    assert readers == []


def test_unread_parameter_of_another_method_warns_once_and_a_typo_is_still_refused():
    from evomerge.errors import RecipeWarning

    data = {
        "merge_method": "slerp",
        "base_model": "a",
        "models": [{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}],
        "parameters": {"t": 0.5},
    }
    with pytest.warns(RecipeWarning) as caught:
        recipe = Recipe.from_dict(data, source="r.yaml")
    assert [str(w.message) for w in caught] == [
        "r.yaml: field models[0].parameters.weight (and 1 more): slerp does not read 'weight'; ignored, as mergekit "
        "ignores it"
    ]
    assert all(entry.parameters is None for entry in recipe.models)
    with pytest.raises(ConfigError, match="did you mean: t"):
        Recipe.from_dict({**data, "parameters": {"tt": 0.5}})


def test_chat_template_names_and_literals_follow_mergekits_rules():
    with pytest.raises(ConfigError, match="field chat_template: 'chatlm' is neither a template name"):
        Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "chatlm"})
    literal = "{% for m in messages %}{{ m.content }}{% endfor %}"
    data = {"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"weight": 1}, "chat_template": literal}
    recipe = Recipe.from_dict(data)
    assert recipe.to_dict()["chat_template"] == literal


def test_tokenizer_block_and_tokenizer_source_together_are_refused_as_mergekit_refuses_them():
    with pytest.raises(ConfigError, match="fields tokenizer and tokenizer_source: give one"):
        Recipe.from_dict(
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "tokenizer_source": "base",
                "tokenizer": {"source": "base"},
            }
        )


def test_token_sources_and_padding_equal_mergekit(tmp_path, monkeypatch):
    """mergekit's test_model_token_id and test_pad_to_multiple_of configurations: the same output."""
    from tests.mergekit_suite import build_models, compare_outputs, load_cases, recipe_models
    from tests.test_mergekit_suite import evomerge_merge, mergekit_merge

    cases = load_cases()
    for name in ("tokenizer_model_token_id", "tokenizer_pad_to_multiple_of"):
        case = cases[name]
        models = build_models(tmp_path / "models", sorted(recipe_models(case.recipe)))
        mergekit_merge(case, models, tmp_path / name / "mergekit", monkeypatch)
        assert evomerge_merge(case, models, tmp_path / name / "evomerge") == 0
        assert compare_outputs(tmp_path / name / "mergekit", tmp_path / name / "evomerge") == []


def test_a_search_space_stays_strict_about_parameters_its_method_does_not_read():
    """A searched or fixed value no merge reads would spend trials on nothing: the space's recipe is refused."""
    from evomerge.candidate.space import SearchSpace, SpaceSpec

    spec = SpaceSpec(
        name="x",
        methods=["task_arithmetic"],
        parameters={"weight": {"low": 0, "high": 1, "default": 0.5}, "t": {"value": 0.3}},
    )
    space = SearchSpace(spec, num_layers=2)
    point = {name: 0.5 for name in space.bounds(["/z/add"])}
    with pytest.raises(ConfigError, match="task_arithmetic has no parameter 't'"):
        space.to_recipe(point, ["/z/add"], "/z/base", "task_arithmetic", 0)


def test_chat_template_auto_takes_the_inputs_template_as_mergekit_does(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from tests.mergekit_suite import Case, build_models, compare_outputs
    from tests.test_mergekit_suite import evomerge_merge, mergekit_merge

    models = build_models(tmp_path / "models", ["tok_base", "model_b"])
    tokenizer = AutoTokenizer.from_pretrained(str(models / "tok_base"))
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tokenizer.save_pretrained(str(models / "tok_base"))
    recipe = {
        "merge_method": "linear",
        "base_model": "tok_base",
        "models": [
            {"model": "tok_base", "parameters": {"weight": 0.5}},
            {"model": "model_b", "parameters": {"weight": 0.5}},
        ],
        "chat_template": "auto",
    }
    case = Case(name="auto", family="chat_template", recipe=recipe)
    mergekit_merge(case, models, tmp_path / "mergekit", monkeypatch)
    assert evomerge_merge(case, models, tmp_path / "evomerge") == 0
    assert compare_outputs(tmp_path / "mergekit", tmp_path / "evomerge") == []
    assert AutoTokenizer.from_pretrained(str(tmp_path / "evomerge")).chat_template == tokenizer.chat_template


def test_a_warning_of_another_kind_is_passed_on_once(capsys):
    """`evomerge merge` prints a RecipeWarning as one line and passes any other warning on, once (passing it on
    inside the recording recorded it again without end: `pytest -W always` ran a merge out of memory)."""
    import warnings

    from evomerge.commands.merge import printed_warnings
    from evomerge.errors import RecipeWarning

    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with printed_warnings():
            warnings.warn("numpy.core is deprecated", DeprecationWarning, stacklevel=1)
            warnings.warn(RecipeWarning("r.yaml: field t: linear does not read 't'"), stacklevel=1)
            warnings.warn(RecipeWarning("r.yaml: field t: linear does not read 't'"), stacklevel=1)
    assert [str(w.message) for w in outer] == ["numpy.core is deprecated"]
    assert capsys.readouterr().err == "evomerge: warning: r.yaml: field t: linear does not read 't'\n"
