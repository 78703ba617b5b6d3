"""PEFT LoRA adapters as inputs: mergekit's `BASE+ADAPTER` and bare adapter folders, kept low rank.

The adapters are real: peft's get_peft_model on the tiny zoo's base, a few AdamW steps, save_pretrained
(tests/finetunes.py). The oracle is mergekit's merge of the same recipe (mergekit merges each adapter into its base
with peft's merge_and_unload first): tensors equal bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from finetunes import lora_adapter
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.lora import LoraCheckpoint
from evomerge.merge.recipe import Recipe


@pytest.fixture(scope="module")
def adapters(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """Two adapters of the tiny base: `add` (attention and MLP, r 4) and `rev` (rsLoRA, per-module rank and alpha,
    the embeddings targeted and the head fully trained as a module to save)."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_zoo / "base"
    return {
        "base": base,
        "add": lora_adapter(base, root / "add", skill="add"),
        "rev": lora_adapter(
            base,
            root / "rev",
            skill="reverse",
            r=8,
            alpha=16,
            targets=("q_proj", "k_proj", "o_proj", "gate_proj", "embed_tokens"),
            use_rslora=True,
            rank_pattern={"o_proj": 2},
            alpha_pattern={"gate_proj": 4},
            modules_to_save=["lm_head"],
            seed=1,
        ),
    }


def _mergekit(recipe: dict, out: Path, cache: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(write_model_card=False, quiet=True, lora_merge_cache=str(cache), copy_tokenizer=False)
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=options)
    return load_file(out / "model.safetensors")


def _merge(recipe: dict, tmp_path: Path, name: str = "ours") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), "--out", str(tmp_path / name)]) == 0
    return tmp_path / name


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in b:
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max()}"


@pytest.mark.parametrize(
    "method,parameters",
    [
        ("task_arithmetic", {"weight": 0.7}),
        ("linear", {"weight": 0.5}),
        ("ties", {"weight": 1.0, "density": 0.6}),
    ],
)
def test_base_plus_adapter_equals_mergekit(adapters, tmp_path, method, parameters):
    base = str(adapters["base"])
    recipe = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": f"{base}+{adapters[a]}", "parameters": parameters} for a in ("add", "rev")],
        "dtype": "float32",
    }
    if method == "linear":
        recipe["models"].append({"model": base, "parameters": {"weight": 0.2}})
    if method == "ties":  # mergekit's own sparsifier, so the kept elements are exactly its
        recipe["evomerge"] = {"kernels": "mergekit-0.1.5"}
    ours = load_file(_merge(recipe, tmp_path) / "model.safetensors")
    theirs = _mergekit({k: v for k, v in recipe.items() if k != "evomerge"}, tmp_path / "theirs", tmp_path / "cache")
    _assert_equal(ours, theirs)
    base_tensors = load_file(adapters["base"] / "model.safetensors")
    changed = {n for n in base_tensors if not torch.equal(ours[n], base_tensors[n])}
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed
    if method != "linear":  # no adapter touches it: its task vectors are zero (a weighted mean rounds)
        assert "model.layers.0.input_layernorm.weight" not in changed


def test_adapter_tensors_are_peft_merge_and_unload(adapters):
    """Each tensor the reader forms is peft's merged weight, and the reader holds only the adapter's tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = Checkpoint(adapters["base"])
    lora = LoraCheckpoint(base, adapters["rev"])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters["base"]), adapters["rev"])
    state = merged.merge_and_unload().state_dict()
    for name in lora.tensor_names():
        assert torch.equal(lora.get(name), state[name]), name
    factors = lora.factors("model.layers.1.self_attn.o_proj.weight")
    assert factors.a.shape[0] == 2 and factors.scale == pytest.approx(16 / 2**0.5)  # rank_pattern, rsLoRA
    assert lora.factors("model.layers.1.mlp.gate_proj.weight").scale == pytest.approx(4 / 8**0.5)  # alpha_pattern
    assert lora.factors("model.embed_tokens.weight").transposed
    held = sum(t.numel() * t.element_size() for t in load_file(adapters["rev"] / "adapter_model.safetensors").values())
    assert lora.nbytes == held < sum(base.get(n).numel() * 4 for n in base.tensor_names())


def test_a_bare_adapter_folder_merges_over_base_model_and_exports_mergekits_form(adapters, tmp_path):
    base = str(adapters["base"])
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": str(adapters["add"]), "parameters": {"weight": 0.8}}, {"model": str(adapters["rev"])}],
        "parameters": {"weight": 0.5},
    }
    out = _merge(recipe, tmp_path)
    written = Recipe.load(out / "recipe.yaml")
    assert [e.model for e in written.models] == [f"{base}+{adapters['add']}", f"{base}+{adapters['rev']}"]
    assert set(written.evomerge.inputs) == {f"{base}+{adapters['add']}", f"{base}+{adapters['rev']}", base}
    cli = Path(sys.executable).with_name("mergekit-yaml")
    run = [str(cli), str(out / "recipe.yaml"), str(tmp_path / "theirs"), "--lora-merge-cache", str(tmp_path / "c")]
    subprocess.run([*run, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], check=True, capture_output=True)
    _assert_equal(load_file(out / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors"))
    again = _merge(yaml.safe_load((out / "recipe.yaml").read_text()), tmp_path, "again")  # the + form reads back
    _assert_equal(load_file(again / "model.safetensors"), load_file(out / "model.safetensors"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err, err
    return err


def test_unsupported_adapters_and_wrong_bases_exit_2(adapters, tiny_zoo, tmp_path, capsys):
    dora = lora_adapter(adapters["base"], tmp_path / "dora", use_dora=True, steps=1)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(adapters["base"]), "models": [{"model": str(dora)}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "parameters": {"weight": 1.0}}))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert "models[0].model" in err and "use_dora" in err and "DoRA" in err
    # an adapter whose recorded base is another local folder than the base_model
    other = json.loads((adapters["add"] / "adapter_config.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter_config.json").write_text(json.dumps({**other, "base_model_name_or_path": str(tiny_zoo / "add")}))
    (moved / "adapter_model.safetensors").write_bytes((adapters["add"] / "adapter_model.safetensors").read_bytes())
    path.write_text(yaml.safe_dump({**recipe, "models": [{"model": str(moved)}], "parameters": {"weight": 1.0}}))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert "base_model_name_or_path" in err and f"{adapters['base']}+{moved}" in err
    assert not (tmp_path / "out").exists()


def _search_config(adapters, name: str, workers: int) -> dict:
    return {
        "name": name,
        "base_model": str(adapters["base"]),
        "models": [str(adapters["add"]), str(adapters["rev"])],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}, {"name": "zoo_reverse_search", "subset": 8}]},
        "budget": {"n_trials": 4},
        "workers": {"count": workers},
        "refine": {"at": [0.5], "steps": 2, "every": 1},
        "portfolio": False,
    }


@pytest.mark.parametrize("workers", [0, 1])
def test_search_over_two_adapters_exports_a_recipe_mergekit_yaml_merges(adapters, tmp_path, monkeypatch, workers):
    from evomerge.config.schema import parse_config
    from evomerge.export.export import export_trial
    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(_search_config(adapters, f"lora{workers}", workers))
    result = run_search(cfg, progress=False, log=None)
    assert result.n_complete == 4 and result.n_failed == 0
    res = export_trial(cfg.run_dir, log=None)
    recipe = Recipe.load(res.recipe)
    base = str(adapters["base"])
    assert {e.model for e in recipe.models} == {f"{base}+{adapters['add']}", f"{base}+{adapters['rev']}"}
    cli = Path(sys.executable).with_name("mergekit-yaml")
    run = [str(cli), str(res.recipe), str(tmp_path / "theirs"), "--lora-merge-cache", str(tmp_path / "cache")]
    subprocess.run([*run, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], check=True, capture_output=True)
    _assert_equal(load_file(res.model_dir / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors"))


def test_a_worker_maps_the_base_once_for_all_its_adapters(adapters):
    """The resident-memory claim, structurally: every adapter reads the one mapped base checkpoint and holds only
    its own factors (bench/lora_memory.py measures the peak RSS)."""
    from evomerge.merge.materialize import Materializer

    mat = Materializer([str(adapters["add"]), str(adapters["rev"])], str(adapters["base"]))
    base, add, rev = (mat._checkpoints[k] for k in (mat.base_model, *mat.inputs[:2]))
    assert isinstance(add, LoraCheckpoint) and isinstance(rev, LoraCheckpoint)
    assert add.base is base and rev.base is base


def test_the_resource_plan_counts_an_adapter_as_its_own_files(adapters):
    """The plan before a search reads an adapter's size from its files, the base once (in both reference forms),
    not a full model per adapter; and it reads no adapter weight (a bare folder or BASE+ADAPTER, same bytes)."""
    from evomerge.capacity import ModelFacts

    base = str(adapters["base"])
    full = Checkpoint(base).nbytes()
    own = [(adapters[k] / "adapter_model.safetensors").stat().st_size for k in ("add", "rev")]
    bare = ModelFacts.of_inputs(base, [str(adapters["add"]), str(adapters["rev"])])
    plus = ModelFacts.of_inputs(base, [f"{base}+{adapters['add']}", f"{base}+{adapters['rev']}"])
    assert bare.input_bytes == plus.input_bytes == (*own, full)
    assert sum(own) < full and bare.params == ModelFacts.of_inputs(base, [base]).params


def test_gpt2_conv1d_adapter_with_trained_biases_is_peft_merge_and_unload(arch_family, tmp_path):
    """GPT-2's Conv1D layers (`fan_in_fan_out`: the delta transposed) and `bias: all` (every bias trained and stored
    whole): the reader's tensors are peft's merged ones."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family = arch_family("gpt2")
    adapter = lora_adapter(
        family["base"], tmp_path / "gpt2_lora", targets=("c_attn", "c_fc"), fan_in_fan_out=True, bias="all", steps=3
    )
    lora = LoraCheckpoint(Checkpoint(family["base"]), adapter)
    assert lora.factors("transformer.h.0.attn.c_attn.weight").transposed
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family["base"]), adapter)
    state = merged.merge_and_unload().state_dict()
    for name in lora.tensor_names():
        assert torch.equal(lora.get(name), state[name]), name
    assert not torch.equal(
        lora.get("transformer.h.0.ln_1.bias"), Checkpoint(family["base"]).get("transformer.h.0.ln_1.bias")
    )
