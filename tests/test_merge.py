"""Merging beyond parity: per-tensor randomness, density edge cases, the resident model, the CLI's failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.errors import CandidateError, ConfigError
from evomerge.export.export import export_recipe
from evomerge.io.checkpoint import Checkpoint
from evomerge.merge.materialize import Materializer, merge_tensor, merged_tensors
from evomerge.merge.plan import Plan
from evomerge.merge.recipe import Recipe

RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def recipe(zoo: Path, method: str, seed: int = 0, **params) -> Recipe:
    params = {"weight": 0.6, **params}
    return Recipe.from_dict(
        {
            "merge_method": method,
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / "add"), "parameters": {"density": 0.4}}, {"model": str(zoo / "reverse")}],
            "parameters": {"density": 0.6, **params},
            "evomerge": {"seed": seed},
        }
    )


def merge_in_order(r: Recipe, names: list[str]) -> dict[str, bytes]:
    ckpts = [Checkpoint(m) for m in r.input_models()]
    plan = Plan(r, ckpts[0].num_layers)
    out = {}
    for name in names:
        torch.rand(17)  # move the global RNG between tensors: results must not care
        t = merge_tensor(
            plan.method, plan.resolve(name), [c.get(name) for c in ckpts], r.input_models(), r.base_model, seed=r.seed
        )
        out[name] = t.numpy().tobytes()
    return out


@pytest.mark.parametrize("method", RANDOM)
def test_random_masks_are_per_tensor(tiny_zoo, method):
    r = recipe(tiny_zoo, method, seed=11)
    names = Checkpoint(tiny_zoo / "base").tensor_names()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    forward = merge_in_order(r, names)
    torch.set_rng_state(state)
    merge_in_order(r, names[:3])
    assert torch.equal(torch.get_rng_state(), _after(state, 3))  # merging leaves the global RNG alone
    torch.manual_seed(123)
    backward = merge_in_order(r, names[::-1])
    assert forward == backward
    other_seed = merge_in_order(r.with_provenance(seed=12), names)
    assert any(other_seed[n] != forward[n] for n in names)


def _after(state: torch.Tensor, draws: int) -> torch.Tensor:
    torch.set_rng_state(state)
    for _ in range(draws):
        torch.rand(17)
    return torch.get_rng_state()


def _merged(r: Recipe) -> dict[str, torch.Tensor]:
    return dict(merged_tensors(r, [Checkpoint(m) for m in r.input_models()]))


@pytest.mark.parametrize(
    "random_method,plain_method,shared",
    [
        ("dare_linear", "task_arithmetic", {}),
        ("della_linear", "task_arithmetic", {}),
        ("dare_ties", "ties", {"normalize": True, "rescale": True}),
        ("della", "ties", {"normalize": True, "rescale": True}),
    ],
)
def test_density_one_equals_the_deterministic_counterpart(tiny_zoo, random_method, plain_method, shared):
    def full(method):
        r = recipe(tiny_zoo, method, seed=5, density=1.0, **shared)
        return r.model_copy(update={"models": [m.model_copy(update={"parameters": None}) for m in r.models]})

    a, b = _merged(full(random_method)), _merged(full(plain_method))
    assert all(torch.equal(a[n], b[n]) for n in b)


def _synthetic(method: str, density: float, rescale: bool, **extra):
    r = Recipe.from_dict(
        {
            "merge_method": method,
            "base_model": "b",
            "models": [{"model": "m"}],
            "parameters": {"weight": 1.0, "density": density, "rescale": rescale, **extra},
        }
    )
    plan = Plan(r, num_layers=1)
    base = torch.zeros(300, 300)
    delta = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    out = merge_tensor(plan.method, plan.resolve("w"), [delta, base], ["m", "b"], "b", seed=1)
    return delta, out


@pytest.mark.parametrize("method,extra", [("dare_linear", {}), ("della_linear", {"epsilon": 0.05})])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_close_to_density(method, extra, density):
    delta, out = _synthetic(method, density, rescale=False, **extra)
    kept = (out != 0).float().mean().item()
    assert abs(kept - density) < 0.01, kept
    assert torch.equal(out[out != 0], delta[out != 0])  # kept entries untouched without rescale
    delta, out = _synthetic(method, density, rescale=True, **extra)
    assert torch.isclose(out.abs().sum(), delta.abs().sum(), rtol=1e-4)  # l1 norm restored


def test_apply_matches_export_and_leaks_nothing(tiny_zoo, tmp_path):
    mat = Materializer([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base")
    assert not mat.model.training and mat.tokenizer.get_vocab() == Checkpoint(tiny_zoo / "base").vocab()
    first = recipe(tiny_zoo, "dare_ties", seed=3)
    second = recipe(tiny_zoo, "task_arithmetic", weight=[0.1, 1.5])
    exported = load_file(export_recipe(first, tmp_path / "x") / "model.safetensors")

    mat.apply(first)
    state = {k: v.clone() for k, v in mat.model.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in exported.items())
    mat.apply(second)
    assert any(not torch.equal(mat.model.state_dict()[k], state[k]) for k in exported)
    mat.apply(first)
    assert all(torch.equal(mat.model.state_dict()[k], v) for k, v in state.items())


def test_resident_model_computes_what_the_exported_checkpoint_computes(tiny_zoo, tmp_path):
    """The resident model is built without random init; buffers (rotary frequencies) must still be right."""
    from transformers import AutoModelForCausalLM

    mat = Materializer([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base")
    r = recipe(tiny_zoo, "ties")
    mat.apply(r)
    loaded = AutoModelForCausalLM.from_pretrained(export_recipe(r, tmp_path / "x")).eval()
    ids = mat.tokenizer("rev abcdef=fedcba 347+8=355", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(mat.model(ids).logits, loaded(ids).logits)


def test_apply_rejects_a_recipe_over_other_models(tiny_zoo):
    mat = Materializer([tiny_zoo / "add"], tiny_zoo / "base")
    with pytest.raises(ConfigError, match="not the models this worker loaded"):
        mat.apply(recipe(tiny_zoo, "ties"))


def test_nan_in_a_merge_is_a_candidate_error(tiny_zoo, tmp_path):
    bad = _copy(tiny_zoo / "add", tmp_path / "nan")
    _edit_tensors(bad, lambda t: t.update({"model.norm.weight": torch.full_like(t["model.norm.weight"], float("nan"))}))
    r = Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": str(bad)}, {"model": str(tiny_zoo / "base")}],
            "parameters": {"weight": 1},
        }
    )
    with pytest.raises(CandidateError, match="model.norm.weight"):
        export_recipe(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


# ---- CLI ----------------------------------------------------------------------------------------


def _write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def test_cli_merge_writes_a_reproducible_checkpoint(tiny_zoo, tmp_path, capsys):
    path = _write_recipe(
        tmp_path,
        f"merge_method: dare_ties\nbase_model: {tiny_zoo}/base\nmodels:\n- model: {tiny_zoo}/add\n- model: "
        f"{tiny_zoo}/reverse\n"
        "parameters: {weight: 0.5, density: 0.5}\n",
    )
    assert main(["merge", str(path), "--out", str(tmp_path / "a"), "--seed", "4"]) == 0
    assert str(tmp_path / "a") in capsys.readouterr().out
    exported = Recipe.load(tmp_path / "a" / "recipe.yaml")
    assert exported.seed == 4 and exported.evomerge.inputs[f"{tiny_zoo}/add"] == Checkpoint(tiny_zoo / "add").sha256()
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "recipe.yaml",
    }
    # the exported recipe alone reproduces the checkpoint byte for byte
    assert main(["merge", str(tmp_path / "a" / "recipe.yaml"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert main(["merge", str(path), "--out", str(tmp_path / "c"), "--seed", "5"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a").config.num_hidden_layers == 4


def test_failed_merge_keeps_the_previous_result(tiny_zoo, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "recipe.yaml").write_text("evomerge: {outputs: {x: previous}}")
    bad = _copy(tiny_zoo / "add", tmp_path / "nan")
    _edit_tensors(bad, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] * float("inf")}))
    r = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_zoo / "base"),
            "models": [{"model": str(bad)}],
            "parameters": {"weight": 1},
        }
    )
    with pytest.raises(CandidateError):
        export_recipe(r, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "recipe.yaml").read_text() == "evomerge: {outputs: {x: previous}}"


def test_non_floating_buffers_are_copied_or_rejected(tmp_path):
    from evomerge.errors import ModelError

    def model(name: str, weight: float, ids: torch.Tensor) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(
            json.dumps({"architectures": ["X"], "model_type": "x", "num_hidden_layers": 1})
        )
        save_file({"w": torch.full((2, 2), weight), "ids": ids}, str(folder / "model.safetensors"))
        return str(folder)

    same = Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": model("a", 1.0, torch.arange(4))}, {"model": model("b", 3.0, torch.arange(4))}],
            "parameters": {"weight": 1},
        }
    )
    out = _merged(same)
    assert torch.equal(out["ids"], torch.arange(4)) and torch.equal(out["w"], torch.full((2, 2), 2.0))
    differ = same.model_copy(
        update={
            "models": [
                same.models[0],
                same.models[1].model_copy(update={"model": model("c", 3.0, torch.arange(4) + 1)}),
            ]
        }
    )
    with pytest.raises(ModelError, match="'ids' differs"):
        _merged(differ)
