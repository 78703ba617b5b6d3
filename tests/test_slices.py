"""mergekit's `slices:` recipes: per-layer merges (the same ranges in every source) and layer stacking (different
ranges, passthrough), equal to mergekit's own merge tensor for tensor; what evomerge cannot run exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_architectures import load_dir, logits, mergekit_merge

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.export.export import export_recipe
from evomerge.merge.recipe import Recipe

T_CURVE = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def slerp_slices(a: Path, b: Path, layers: int, t=None) -> dict:
    """The SLERP recipe as published with most merged models: one slice over every layer of both."""
    return {
        "merge_method": "slerp",
        "base_model": str(a),
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, layers]}, {"model": str(b), "layer_range": [0, layers]}]}
        ],
        "parameters": {"t": t if t is not None else T_CURVE},
        "dtype": "float32",
    }


def stack(family: dict[str, Path]) -> dict:
    """A frankenmerge: layers 0-1 of a, 1-2 of b, 2 of a (scaled MLP): 5 layers from 3-layer models."""
    a, b = str(family["a"]), str(family["b"])
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3]}]},
            {
                "sources": [
                    {
                        "model": a,
                        "layer_range": [2, 3],
                        "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
                    }
                ]
            },
        ],
        "dtype": "float32",
    }


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_layer_slices_equal_mergekit(arch, arch_family, tmp_path):
    family = arch_family(arch)
    t = T_CURVE if arch == "llama" else [{"filter": "attn", "value": [0, 1]}, {"value": 0.3}]
    recipe = Recipe.from_dict(slerp_slices(family["a"], family["b"], 3, t))
    ours = load_dir(export_recipe(recipe, tmp_path / "ours"))
    assert_same(ours, mergekit_merge(recipe, tmp_path / "theirs"))


def test_slices_with_their_own_parameters_and_base_equal_mergekit(arch_family, tmp_path, monkeypatch):
    """Two slices with the same ranges in every source, per-slice parameters (a slice's parameters sit between the
    sources' and the global ones), a slice's own base_model, gradients across each slice's layers."""
    monkeypatch.setenv("EVOMERGE_KERNELS", "mergekit")
    f = {k: str(v) for k, v in arch_family("llama").items()}
    recipe = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": f["base"],
            "slices": [
                {
                    "sources": [
                        {"model": f["base"], "layer_range": [0, 2]},
                        {"model": f["a"], "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
                        {"model": f["b"], "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                    ],
                    "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]},
                },
                {
                    "sources": [
                        {"model": f["a"], "layer_range": [2, 3], "parameters": {"weight": 0.3, "density": 0.6}},
                        {"model": f["b"], "layer_range": [2, 3], "parameters": {"weight": 0.8, "density": 0.4}},
                    ],
                    "base_model": f["a"],
                    "parameters": {"normalize": False},
                },
            ],
            "parameters": {"weight": 1.0, "density": 0.9},
        }
    )
    ours = load_dir(export_recipe(recipe, tmp_path / "ours"))
    assert_same(ours, mergekit_merge(recipe, tmp_path / "theirs"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_stacking_equals_mergekit_and_loads_with_its_new_depth(arch, arch_family, tmp_path):
    from transformers import AutoModelForCausalLM

    family = arch_family(arch)
    recipe = Recipe.from_dict(stack(family))
    out = export_recipe(recipe, tmp_path / "ours")
    ours = load_dir(out)
    assert_same(ours, mergekit_merge(recipe, tmp_path / "theirs"))
    a, b = load_dir(family["a"]), load_dir(family["b"])
    prefix = "model.layers" if arch == "llama" else "transformer.h"
    down = "mlp.down_proj.weight" if arch == "llama" else "mlp.c_proj.weight"
    assert torch.equal(ours[f"{prefix}.2.{down}"], b[f"{prefix}.1.{down}"])  # output layer 2 is b's layer 1
    assert torch.equal(ours[f"{prefix}.4.{down}"], a[f"{prefix}.2.{down}"] * 0.5)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers" if arch == "llama" else "n_layer"] == 5
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5 and logits(model).isfinite().all()


def test_stacking_rebuilds_per_layer_config_lists(arch_family, tmp_path):
    """Qwen2's config lists a type per layer (`layer_types`); the stacked model's list has one per output layer,
    taken from the layer it came from (mergekit 0.1.5 leaves the old list and transformers refuses the config)."""
    from transformers import AutoModelForCausalLM

    family = arch_family("qwen2")
    out = export_recipe(Recipe.from_dict(stack(family)), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and len(config["layer_types"]) == 5
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 5


def test_a_full_single_slice_is_the_models_form(arch_family, tmp_path):
    """Same ranges over every layer: `as_models_form` writes it with `models:`, which merges the same tensors and
    which a search space reads as its point (a search's starting recipe)."""
    from evomerge.candidate.space import SearchSpace, load_space_spec

    f = arch_family("llama")
    sliced = Recipe.from_dict(slerp_slices(f["a"], f["b"], 3))
    plain = sliced.as_models_form({str(f["a"]): 3, str(f["b"]): 3})
    assert plain is not None and plain.slices is None and [e.model for e in plain.models] == [str(f["a"]), str(f["b"])]
    assert_same(
        load_dir(export_recipe(sliced, tmp_path / "sliced")), load_dir(export_recipe(plain, tmp_path / "plain"))
    )
    space = SearchSpace.over(load_space_spec("slerp"), f["a"])
    point = space.from_recipe(sliced)
    assert point == space.from_recipe(plain) and len(set(point.values())) > 2  # the curve read back, not defaults


def test_slices_that_are_not_one_per_layer_merge_have_no_models_form(arch_family):
    f = {k: str(v) for k, v in arch_family("llama").items()}
    depths = {f["a"]: 3, f["b"]: 3, f["base"]: 3}
    partial = slerp_slices(f["a"], f["b"], 2)
    two = {
        **partial,
        "slices": [
            {"sources": [{"model": f["a"], "layer_range": [0, 1]}, {"model": f["b"], "layer_range": [0, 1]}]},
            {"sources": [{"model": f["a"], "layer_range": [1, 3]}, {"model": f["b"], "layer_range": [1, 3]}]},
        ],
    }
    overlapping = {**slerp_slices(f["a"], f["b"], 3)}
    overlapping["slices"] = [{**overlapping["slices"][0], "parameters": {"t": 0.2}}]
    outside_base = {
        "merge_method": "linear",
        "base_model": f["base"],
        "slices": [  # models: would add base as an input
            {"sources": [{"model": f["a"], "layer_range": [0, 3]}, {"model": f["b"], "layer_range": [0, 3]}]}
        ],
        "parameters": {"weight": 0.5},
    }
    for spec in (partial, two, overlapping, outside_base):
        assert Recipe.from_dict(spec).as_models_form(depths) is None
    folded = {**slerp_slices(f["a"], f["b"], 3), "parameters": None}
    folded["slices"] = [{**folded["slices"][0], "parameters": {"t": 0.2}}]
    assert Recipe.from_dict(folded).as_models_form(depths).parameters == {"t": 0.2}


def test_in_memory_per_layer_slices_equal_the_export_and_stacking_is_refused(arch_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import Materializer

    f = arch_family("gemma")
    recipe = Recipe.from_dict(slerp_slices(f["a"], f["b"], 3, [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]))
    mat = Materializer([f["b"]], f["a"])
    mat.apply(recipe)
    reloaded = AutoModelForCausalLM.from_pretrained(export_recipe(recipe, tmp_path / "out")).eval()
    assert torch.equal(logits(mat.model), logits(reloaded))
    with pytest.raises(ConfigError, match="makes a model of 5 layers from 3-layer inputs"):
        mat.apply(Recipe.from_dict(stack({"a": f["a"], "b": f["b"]})))


def test_the_exported_slices_recipe_reproduces_itself(arch_family, tmp_path, capsys):
    f = arch_family("llama")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(stack(f)))
    assert main(["merge", str(path), "--out", str(tmp_path / "one")]) == 0
    written = yaml.safe_load((tmp_path / "one" / "recipe.yaml").read_text())
    assert written["slices"][1]["sources"][0]["layer_range"] == [1, 3] and "models" not in written
    assert main(["merge", str(tmp_path / "one" / "recipe.yaml"), "--out", str(tmp_path / "two")]) == 0
    assert_same(load_dir(tmp_path / "one"), load_dir(tmp_path / "two"))
    assert main(["verify", str(tmp_path / "two")]) == 0


BAD = {
    "modules": ({"merge_method": "linear", "modules": {"text": {"models": [{"model": "a"}]}}}, "field 'modules'"),
    "both_forms": (
        {
            "merge_method": "linear",
            "models": [{"model": "A", "parameters": {"weight": 1}}],
            "slices": [{"sources": [{"model": "A", "layer_range": [0, 3]}]}],
        },
        "exactly one of `models:` and `slices:`",
    ),
    "lengths_differ": (
        {
            "merge_method": "slerp",
            "base_model": "A",
            "parameters": {"t": 0.5},
            "slices": [{"sources": [{"model": "A", "layer_range": [0, 3]}, {"model": "B", "layer_range": [0, 2]}]}],
        },
        "field slices[0].sources[1].layer_range: [0, 2] spans 2 layers but sources[0] spans 3",
    ),
    "empty_range": (
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [2, 2]}]}]},
        "field slices[0].sources[0].layer_range: [2, 2] is empty",
    ),
    "model_twice": (
        {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": "A", "layer_range": [0, 1], "parameters": {"weight": 1}},
                        {"model": "A", "layer_range": [1, 2], "parameters": {"weight": 1}},
                    ]
                }
            ],
        },
        "listed twice in one slice",
    ),
    "two_sources_passthrough": (
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}, {"model": "B", "layer_range": [0, 1]}]}],
        },
        "field slices[0]: passthrough",
    ),
    "unknown_key": (
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_rang": [0, 1]}]}]},
        "did you mean: layer_range",
    ),
    "past_the_last_layer": (
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [1, 4]}]}]},
        "field slices[0].sources[0].layer_range: [1, 4] reaches past the 3 layers",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_slices_form_evomerge_cannot_run_exits_2_naming_it(case, arch_family, tmp_path, capsys):
    f = arch_family("llama")
    spec, message = BAD[case]
    text = yaml.safe_dump(spec).replace("model: A", f"model: {f['a']}").replace("model: B", f"model: {f['b']}")
    text = text.replace("base_model: A", f"base_model: {f['a']}")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    capsys.readouterr()
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evomerge: error: {path}") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()
