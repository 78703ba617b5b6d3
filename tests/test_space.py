"""SearchSpace: trial points <-> recipes (gradient lists per layer group, filters per tensor kind)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evomerge.candidate.space import SearchSpace, SpaceSpec, load_space_spec
from evomerge.errors import ConfigError
from evomerge.merge.plan import Plan
from evomerge.merge.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent
SPACES = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))


def random_point(space: SearchSpace, models: list, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    return {name: rng.uniform(d.low, d.high) for name, d in space.bounds(models).items()}


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("layers", [4, 6])
def test_round_trip_every_shipped_space(name, layers):
    spec = load_space_spec(name)
    space = SearchSpace(spec, layers)
    models = ["/z/add"] if spec.max_models == 1 else ["/z/add", "/z/reverse"]
    for seed in range(3):
        point = random_point(space, models, seed)
        recipe = space.to_recipe(point, models, "/z/base", spec.methods[0], seed=7)
        assert recipe.merge_method == spec.methods[0] and recipe.seed == 7
        # through YAML, as workers and export see it
        again = Recipe.from_yaml(recipe.to_yaml())
        back = space.from_recipe(again)
        assert back.keys() == point.keys()
        # the recipe keeps 4 significant digits of each searched number (what is scored, exported and shown)
        assert all(back[k] == pytest.approx(float(f"{point[k]:.4g}"), abs=1e-12) for k in point)
        assert space.to_recipe(back, models, "/z/base", spec.methods[0], seed=7) == recipe, "rounding is idempotent"


def test_layer_groups_become_gradient_lists_and_kinds_become_filters():
    spec = SpaceSpec(
        methods=["ties"],
        layers_per_group=2,
        kinds=["self_attn", "mlp"],
        embeddings=True,
        parameters={"weight": {"low": 0, "high": 1, "default": 0.25}, "density": {"value": 0.7}},
    )
    space = SearchSpace(spec, num_layers=6)
    models = ["/z/add"]
    names = list(space.bounds(models))
    assert names == [
        "weight.add.embed",
        "weight.add.self_attn.g0",
        "weight.add.self_attn.g1",
        "weight.add.self_attn.g2",
        "weight.add.mlp.g0",
        "weight.add.mlp.g1",
        "weight.add.mlp.g2",
        "weight.add.rest",
    ]
    point = {n: 0.1 * i for i, n in enumerate(names)}
    recipe = space.to_recipe(point, models, "/z/base", "ties", seed=0)
    weight = recipe.models[0].parameters["weight"]
    assert [(c.filter, c.value) for c in weight] == [
        ("embed_tokens", 0.0),
        ("lm_head", 0.0),
        ("self_attn", [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]),  # 4 significant digits, not 0.30000000000000004
        ("mlp", [0.4, 0.4, 0.5, 0.5, 0.6, 0.6]),
        (None, 0.7),  # norms, which no kind matches: the model's `rest` value
    ]
    assert recipe.models[0].parameters["density"] == 0.7
    # what the merge engine will read per tensor (mergekit's resolver: layer 3 of 0..5 is t = 3/5)
    plan = Plan(recipe, num_layers=6)

    def read(tensor: str) -> float:
        return plan.resolve(tensor).per_input["/z/add"]["weight"]

    assert plan.resolve("model.layers.3.self_attn.q_proj.weight").t == 3 / 5
    assert read("model.layers.3.self_attn.q_proj.weight") == 0.2
    assert read("model.layers.5.mlp.up_proj.weight") == pytest.approx(0.6)
    assert read("model.layers.5.input_layernorm.weight") == pytest.approx(0.7)
    assert read("lm_head.weight") == 0.0


def test_control_points_are_a_gradient_of_length_k_and_slerp_lists_both_endpoints():
    space = SearchSpace(load_space_spec("slerp"), num_layers=6)
    point = random_point(space, ["/z/add"])
    recipe = space.to_recipe(point, ["/z/add"], "/z/base", "slerp", seed=0)
    assert [m.model for m in recipe.models] == ["/z/base", "/z/add"]
    t = recipe.parameters["t"]
    assert [c.filter for c in t] == ["self_attn", "mlp", None]
    assert len(t[0].value) == 5 == len(t[1].value)


def test_baselines_are_defaults_then_each_model_alone():
    space = SearchSpace(load_space_spec("task_arithmetic"), num_layers=4)
    models = ["/z/add", "/z/reverse"]
    labels = [label for label, _ in space.baselines(models)]
    assert labels == ["defaults", "only add", "only reverse"]
    only_add = dict(space.baselines(models))["only add"]
    recipe = space.to_recipe(only_add, models, "/z/base", "task_arithmetic", seed=0)
    weights = {Path(m.model).name: m.parameters["weight"] for m in recipe.models}
    assert weights == {"add": 1.0, "reverse": 0.0}
    assert recipe.parameters["lambda"] == 1.0
    slerp = SearchSpace(load_space_spec("slerp"), num_layers=4)
    ends = dict(slerp.baselines(["/z/add"]))
    assert set(ends["only base"].values()) == {0.0} and set(ends["only add"].values()) == {1.0}


def test_from_recipe_reads_a_hand_written_mergekit_recipe():
    space = SearchSpace(load_space_spec("ties"), num_layers=4)
    text = """
merge_method: ties
base_model: /z/base
models:
  - model: /z/add
    parameters: {weight: 0.3, density: [0.2, 0.8]}
  - model: /z/reverse
    parameters: {weight: [{filter: mlp, value: 0.9}, {value: 0.1}]}
parameters: {density: 0.6, normalize: true}
"""
    point = space.from_recipe(Recipe.from_yaml(text))
    assert point["weight.add.mlp.g1"] == 0.3
    assert point["density.add.self_attn.g0"] == pytest.approx(0.2)
    assert point["density.add.self_attn.g1"] == pytest.approx(0.2 + 0.6 * 2 / 3)  # read at layer 2 of 0..3
    assert point["weight.reverse.mlp.g0"] == 0.9 and point["weight.reverse.self_attn.g0"] == 0.1
    assert point["density.reverse.embed"] == 0.6  # a global value fills in


def test_layer_groups_reach_the_merged_weights(tiny_zoo):
    """Through the real merge engine: layers 0-1 take `add`'s task vector, layers 2-3 `reverse`'s."""
    import torch

    from evomerge.merge.materialize import Materializer

    spec = SpaceSpec(methods=["task_arithmetic"], layers_per_group=2, parameters={"weight": {"low": 0, "high": 1}})
    models = [tiny_zoo / "add", tiny_zoo / "reverse"]
    space = SearchSpace(spec, num_layers=4)
    point = {"weight.add.g0": 1.0, "weight.add.g1": 0.0, "weight.reverse.g0": 0.0, "weight.reverse.g1": 1.0}
    mat = Materializer(models, tiny_zoo / "base")
    mat.apply(space.to_recipe(point, models, tiny_zoo / "base", "task_arithmetic", seed=0))
    merged = mat.model.state_dict()
    from safetensors.torch import load_file

    add = load_file(tiny_zoo / "add" / "model.safetensors")
    rev = load_file(tiny_zoo / "reverse" / "model.safetensors")
    for layer, source in [(0, add), (1, add), (2, rev), (3, rev)]:
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        torch.testing.assert_close(merged[name], source[name], rtol=0, atol=1e-6)


def test_auto_groups_follow_the_model_depth():
    spec = load_space_spec("task_arithmetic")
    assert spec.layers_per_group == "auto"
    shallow = SearchSpace(spec, num_layers=6)
    assert shallow.spec.layers_per_group == 1 and shallow.n_groups == 6 and not shallow.spec.control_points
    deep = SearchSpace(spec, num_layers=32)
    assert deep.spec.control_points == 8 and deep.n_groups == 8  # one point per 4 layers, 4 to 8 of them
    assert SearchSpace(spec, num_layers=12).spec.control_points == 4
    with pytest.raises(ConfigError, match="layers_per_group"):
        load_space_spec(
            {"methods": ["ties"], "layers_per_group": "all", "parameters": {"weight": {"low": 0, "high": 1}}}
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_projections_are_each_layer_matrix_of_the_architecture(arch_family, arch):
    """`kinds: [projections]` gives every weight matrix of a layer its own value, named as the architecture names it;
    norms (and biases with their matrix) follow, nothing is left to the `rest` value but the norms."""
    from evomerge.merge.plan import Plan

    paths = arch_family(arch)
    spec = load_space_spec("task_arithmetic")
    assert spec.kinds == ["projections"]
    space = SearchSpace.over(spec, paths["base"])
    expected = {
        "llama": {
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        },
        "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
        "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    }[arch]
    assert set(space.spec.kinds) == expected
    models = [str(paths["a"]), str(paths["b"])]
    point = {name: 0.01 * i for i, name in enumerate(space.bounds(models))}
    recipe = space.to_recipe(point, models, str(paths["base"]), "task_arithmetic", seed=0)
    plan = Plan(recipe, num_layers=space.num_layers)
    from evomerge.io.checkpoint import Checkpoint

    names = Checkpoint(paths["base"]).tensor_names()
    for name in names:
        got = plan.resolve(name).per_input[str(paths["a"])]["weight"]
        kinds = [k for k in space.spec.kinds if k in name]
        assert len(kinds) <= 1, f"{name} matches {kinds}"
        if kinds:
            layer = (
                int(name.split(".h.")[1].split(".")[0])
                if ".h." in name
                else int(name.split("layers.")[1].split(".")[0])
            )
            slot = f"weight.a.{kinds[0]}.g{layer}"
            assert got == pytest.approx(point[slot]), name


@pytest.mark.parametrize("name", SPACES)
def test_every_shipped_space_merges_the_zoo(tiny_zoo, name):
    """Its default merge and a random point run through the merge engine (mergekit's kernels or evomerge's) into
    a resident model: finite weights that moved away from the base."""
    import torch
    from safetensors.torch import load_file

    from evomerge.merge.materialize import Materializer

    spec = load_space_spec(name)
    models = [tiny_zoo / "add"] if spec.max_models == 1 else [tiny_zoo / "add", tiny_zoo / "reverse"]
    space = SearchSpace.over(spec, tiny_zoo / "base")
    mat = Materializer(models, tiny_zoo / "base")
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    for point in (space.defaults(models), random_point(space, models, seed=1)):
        mat.apply(space.to_recipe(point, models, tiny_zoo / "base", spec.methods[0], seed=0))
        merged = {n: t.detach() for n, t in mat.model.state_dict().items()}
        assert all(torch.isfinite(t).all() for t in merged.values())
        assert any(not torch.equal(merged[n], base[n]) for n in base)


def test_per_model_parameters_and_baseline_ends_come_from_each_methods_entry():
    """Per model or shared is the method's own (DELLA's epsilon per model, RAM's shared); only a `t` that runs from
    the base to the model (slerp, not NearSwap's threshold) has both ends as baselines."""
    ram = SpaceSpec(methods=["ramplus_tl"], parameters={"epsilon": {"low": 1e-6, "high": 1e-3}})
    della = SpaceSpec(methods=["della"], parameters={"epsilon": {"low": 0.0, "high": 0.2}})
    assert not ram.per_model("epsilon") and della.per_model("epsilon")
    assert [s.model for s in SearchSpace(ram, 4).slots(["/z/a", "/z/b"])] == [None]
    nearswap = SearchSpace(load_space_spec("nearswap"), num_layers=4)
    assert [label for label, _ in nearswap.baselines(["/z/add"])] == ["defaults"]
    recipe = nearswap.to_recipe(nearswap.defaults(["/z/add"]), ["/z/add"], "/z/base", "nearswap", seed=0)
    assert recipe.parameters["t"] == 1e-4 and recipe.models[0].parameters is None
