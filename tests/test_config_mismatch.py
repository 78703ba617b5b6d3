"""Inputs that disagree: config.json fields that define a model's shape must agree, even where the tensors happen
to match; `--allow-config-mismatch` (merge, audit) and `allow_config_mismatch: true` (search) override it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from archs import edit_config

from evomerge.cli import main

# field -> the value the edited copy gets (the tiny Llama has hidden 32, 3 layers, 4 heads, 2 KV heads, 64, 45 tokens)
EDITS = {
    "model_type": ("mistral", "model_type is mistral, but", "has llama"),
    "architectures": (["MistralForCausalLM"], "architectures is MistralForCausalLM, but", "has LlamaForCausalLM"),
    "hidden_size": (64, "hidden_size is 64, but", "has 32"),
    "num_hidden_layers": (4, "num_hidden_layers is 4, but", "has 3"),
    "num_attention_heads": (8, "num_attention_heads is 8, but", "has 4"),
    "num_key_value_heads": (4, "num_key_value_heads is 4, but", "has 2"),
    "intermediate_size": (128, "intermediate_size is 128, but", "has 64"),
    "vocab_size": (46, "vocab_size is 46, but", "has 45"),
}


def recipe(tmp_path: Path, base: Path, models: list[Path]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
            }
        )
    )
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("field", sorted(EDITS))
def test_merge_refuses_a_config_mismatch_and_the_flag_overrides_it(field, arch_family, tmp_path, capsys):
    family = arch_family("llama")
    value, says, other = EDITS[field]
    odd = edit_config(family["a"], tmp_path / "odd", **{field: value})
    path = recipe(tmp_path, family["base"], [odd, family["b"]])
    capsys.readouterr()  # the fixture's build output
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert f"{odd}: config.json {says} {family['base']} {other}" in err and "--allow-config-mismatch" in err
    assert not (tmp_path / "out").exists()
    # the tensors match, so the user may merge them anyway; the output takes the base's config
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--allow-config-mismatch"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_other_architectures_spell_the_fields_their_way(arch_family, tmp_path, capsys):
    family = arch_family("gpt2")
    odd = edit_config(family["a"], tmp_path / "odd", n_embd=64)
    capsys.readouterr()
    assert main(["merge", str(recipe(tmp_path, family["base"], [odd])), "--out", str(tmp_path / "out")]) == 2
    assert "config.json n_embd is 64, but" in one_line_error(capsys)


def test_a_llama_and_a_mistral_with_the_same_tensors_merge_only_when_allowed(arch_family, tmp_path, capsys):
    """The realistic case: same tensor names and shapes, different model_type; with the flag the merge takes the
    base's architecture and transformers loads it."""
    from transformers import AutoModelForCausalLM

    family = arch_family("llama")
    mistral = edit_config(family["a"], tmp_path / "mistral", model_type="mistral", architectures=["MistralForCausalLM"])
    path = recipe(tmp_path, family["base"], [mistral, family["b"]])
    capsys.readouterr()
    assert main(["audit", str(path)]) == 2
    assert "model_type is mistral, but" in one_line_error(capsys)
    assert main(["audit", str(path), "--allow-config-mismatch"]) == 0
    capsys.readouterr()
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--allow-config-mismatch"]) == 0
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")).__name__ == "LlamaForCausalLM"


def test_search_refuses_a_config_mismatch_unless_the_config_allows_it(arch_family, tmp_path, monkeypatch, capsys):
    family = arch_family("llama")
    odd = edit_config(family["a"], tmp_path / "odd", intermediate_size=128)
    monkeypatch.chdir(tmp_path)
    config = {
        "name": "mismatch",
        "base_model": str(family["base"]),
        "models": [str(odd), str(family["b"])],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}]},
        "budget": {"n_trials": 1},
        "workers": {"count": 0},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["search", str(path)]) == 2
    assert "intermediate_size is 128, but" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()  # refused before the study, its lock or runs/<name>/ exist
    path.write_text(yaml.safe_dump({**config, "allow_config_mismatch": True}))
    assert main(["search", str(path)]) == 0
    assert "allow_config_mismatch: true" in (tmp_path / "runs" / "mismatch" / "config.yaml").read_text()
    assert main(["audit", str(path)]) == 0  # audit honours the search config's permission too
