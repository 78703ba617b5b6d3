"""Parity with mergekit as the oracle: our export equals mergekit's merge tensor for tensor.

Every registered method (merge/registry.py; the random ones, DARE and DELLA, at density 1), with gradients,
`self_attn`/`mlp` filters and per-model parameters, under both kernel sets. mergekit runs in process
(`mergekit.merge.run_merge`, what `mergekit-yaml` calls) on the YAML our Recipe writes, so this also proves
mergekit reads our recipes as we do. The CLI itself runs in one slow test. Equality is exact: mergekit-0.1.5
runs mergekit's kernels (or bit-identical ones); evomerge-1 differs from mergekit only where magnitudes tie at a
density boundary (tests/test_kernels_evomerge.py), which the zoo's float32 task vectors never do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.export.export import export_recipe
from evomerge.merge.recipe import Recipe
from evomerge.merge.registry import REGISTRY

ATTN_MLP = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]

RECIPES = {
    "linear": {
        "merge_method": "linear",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": [0.2, 0.8]}},
            {"model": "reverse", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]}},
        ],
        "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 1.0}]},
    },
    "linear_unnormalized": {
        "merge_method": "linear",
        "models": [
            {"model": "add", "parameters": {"weight": 0.3}},
            {"model": "reverse", "parameters": {"weight": 0.6}},
        ],
        "parameters": {"normalize": False},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "add"}],
        "parameters": {"t": ATTN_MLP},
    },
    "nuslerp_base": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": 0.3}},
            {"model": "reverse", "parameters": {"weight": [0.9, 0.2]}},
        ],
    },
    "nuslerp_rowwise": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "add", "parameters": {"weight": 0.6}},
            {"model": "reverse", "parameters": {"weight": 0.4}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "add", "parameters": {"weight": [0.5, 1.0, 0.2]}}, {"model": "reverse"}],
        "parameters": {"weight": 0.7, "lambda": 0.8},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
            {
                "model": "reverse",
                "parameters": {
                    "weight": 0.5,
                    "density": [{"filter": "self_attn", "value": 0.3}, {"value": [0.9, 0.4]}],
                },
            },
        ],
        "parameters": {"normalize": True},
    },
    "ties_unnormalized_bf16": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
        "parameters": {"weight": 1.0, "density": 0.7, "normalize": False},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"gamma": 0.05}},
            {"model": "reverse", "parameters": {"density": [0.6, 0.95]}},
        ],
        "parameters": {"weight": 1.0, "density": 0.8},
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": 0.6}},
            {"model": "reverse", "parameters": {"weight": 0.4}},
        ],
        "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.9}], "gamma": 0.02, "normalize": True},
    },
    # DARE and DELLA draw random masks (mergekit from the global RNG, evomerge-1 from its counter stream), so their
    # whole-model parity is at density 1, where nothing is dropped: weights, lambda, rescale and normalisation
    # as mergekit applies them. The masks themselves: tests/test_kernels.py (mergekit-0.1.5, same per-tensor seed,
    # bit-identical) and tests/test_kernels_evomerge.py (evomerge-1's documented rules).
    "dare_ties_density_1": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": [0.3, 0.9], "density": 1.0}},
            {"model": "reverse", "parameters": {"weight": 0.6, "density": 1.0}},
        ],
        "parameters": {"lambda": 0.9},
    },
    "dare_linear_density_1": {
        "merge_method": "dare_linear",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}]}},
            {"model": "reverse", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"density": 1.0},
    },
    "della_density_1": {
        "merge_method": "della",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": 0.7, "density": 1.0, "epsilon": 0.05}},
            {"model": "reverse", "parameters": {"weight": [0.2, 0.6], "density": 1.0, "epsilon": 0.05}},
        ],
        "parameters": {"lambda": 1.2},
    },
    "della_linear_density_1": {
        "merge_method": "della_linear",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": 0.5, "density": 1.0}},
            {"model": "reverse", "parameters": {"weight": 0.3, "density": 1.0}},
        ],
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
        "parameters": {"filter_wise": True},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
        "parameters": {"select_topk": [{"filter": "mlp", "value": [0.3, 0.9]}, {"value": 0.6}]},
    },
    "sce_all": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "add"}, {"model": "reverse"}, {"model": "base"}],
        "parameters": {"max_iter": 5},
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [
            {"model": "add", "parameters": {"weight": [0.2, 0.8]}},
            {"model": "reverse", "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.4}]}},
        ],
    },
    "multislerp_no_base": {
        "merge_method": "multislerp",
        "models": [
            {"model": "add", "parameters": {"weight": 0.3}},
            {"model": "reverse", "parameters": {"weight": 0.6}},
        ],
        "parameters": {"normalize_weights": False},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "base",
        "models": [{"model": "add"}],
        "parameters": {"t": [{"filter": "mlp", "value": [0.0005, 0.005]}, {"value": 0.002}]},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "base",
        "models": [{"model": "add"}],
    },
    "ram": {
        "merge_method": "ram",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
        "parameters": {"epsilon": 0.001},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": [{"model": "add"}, {"model": "reverse"}],
        "parameters": {"r": [0.1, 0.8], "alpha": 0.5},
    },
    "passthrough": {
        "merge_method": "passthrough",
        "models": [{"model": "add", "parameters": {"scale": [{"filter": "mlp", "value": 0.5}]}}],
    },
}


def recipe_for(zoo: Path, spec: dict) -> Recipe:
    return Recipe.from_dict(spec, base_dir=zoo)


def mergekit_merge(recipe: Recipe, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return _load_dir(out)


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        assert torch.equal(ours[name], t), f"{name}: max diff {(ours[name].double() - t.double()).abs().max()}"


@pytest.mark.parametrize("method", sorted(m for m, info in REGISTRY.items() if not info.evomerge_only))
def test_every_registered_method_has_a_parity_case(method):
    """A method mergekit has enters merge/registry.py with a case here: its export equals mergekit's merge. (An
    evomerge-only method has no mergekit reference: tests/test_registry.py asks it for a formula test instead.)"""
    assert any(spec["merge_method"] == method for spec in RECIPES.values()), f"add a RECIPES case for {method}"


@pytest.mark.parametrize("kernels", ["evomerge-1", "mergekit-0.1.5"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_export_equals_mergekit(tiny_zoo, tmp_path, name, kernels):
    recipe = recipe_for(tiny_zoo, RECIPES[name]).with_provenance(kernels=kernels)
    ours = _load_dir(export_recipe(recipe, tmp_path / "ours"))
    theirs = mergekit_merge(recipe, tmp_path / "theirs")
    assert_same(ours, theirs)
    # the merge did something: differs from every input on at least one tensor (passthrough: scales mlp)
    for model in recipe.input_models():
        source = _load_dir(Path(model))
        assert any(not torch.equal(ours[k], source[k].to(ours[k].dtype)) for k in source), model


@pytest.mark.slow
def test_mergekit_yaml_cli_reproduces_our_exported_recipe(tiny_zoo, tmp_path):
    """Decision 2 end to end: the recipe.yaml we export (evomerge block included) drives `mergekit-yaml`."""
    recipe = recipe_for(tiny_zoo, RECIPES["ties"])
    ours = export_recipe(recipe, tmp_path / "ours")
    cli = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run(
        [
            str(cli),
            str(ours / "recipe.yaml"),
            str(tmp_path / "theirs"),
            "--no-write-model-card",
            "--no-copy-tokenizer",
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    assert_same(_load_dir(ours), _load_dir(tmp_path / "theirs"))
