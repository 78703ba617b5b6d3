"""`evomerge audit` on the tiny zoo: statistics are computed from the weights, bad inputs exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evomerge.analysis.audit import sample_positions, tensor_group
from evomerge.cli import main


def _derived(src: Path, out: Path, fn) -> Path:
    """A copy of checkpoint `src` whose every tensor is fn(name, tensor)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: fn(k, v).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def _config(tmp_path: Path, base: Path, models: list) -> Path:
    import yaml

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(base), "models": models}))
    return path


def _audit_json(capsys, config: Path, *extra: str) -> dict:
    assert main(["audit", str(config), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _layer_groups(report: dict) -> list[dict]:
    return [g for g in report["groups"] if g["row"].startswith("layer ")]


def test_model_against_itself_agrees_everywhere(tiny_zoo, tmp_path, capsys):
    add = tiny_zoo / "add"
    report = _audit_json(capsys, _config(tmp_path, tiny_zoo / "base", [str(add), {"model": str(add)}]))
    assert report["models"] == ["add#1", "add#2"]
    rows = {g["row"] for g in report["groups"]}
    assert rows == {"embed", "layer 0", "layer 1", "layer 2", "layer 3", "norm", "lm_head"}
    for g in report["groups"]:
        assert g["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert g["spearman"] == pytest.approx(1.0, abs=1e-6)
        assert g["conflict"] == 0.0
        a, b = g["magnitude_per_model"]
        assert a == b and a > 0
    assert any("No sign conflict" in line for line in report["summary"])


def test_flipped_delta_is_opposed(tiny_zoo, tmp_path, capsys):
    from safetensors.torch import load_file

    base = load_file(str(tiny_zoo / "base" / "model.safetensors"))
    flipped = _derived(tiny_zoo / "add", tmp_path / "flipped", lambda k, v: 2 * base[k] - v)
    report = _audit_json(capsys, _config(tmp_path, tiny_zoo / "base", [str(tiny_zoo / "add"), str(flipped)]))
    for g in report["groups"]:
        assert g["cosine"] == pytest.approx(-1.0, abs=1e-4)
        assert g["spearman"] == pytest.approx(-1.0, abs=1e-3)
        assert g["conflict"] == pytest.approx(1.0, abs=1e-3)
    assert "opposed" in report["summary"][0]


def test_zoo_statistics_match_a_direct_computation(tiny_zoo, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    config = _config(tmp_path, Path("zoo/base"), ["zoo/add", "zoo/reverse"])
    (tmp_path / "zoo").symlink_to(tiny_zoo)  # relative paths resolve from the YAML's folder
    report = _audit_json(capsys, config)
    assert report["models"] == ["add", "reverse"]
    w = {m: load_file(str(tiny_zoo / m / "model.safetensors")) for m in ("base", "add", "reverse")}
    names = [n for n in w["base"] if n.startswith("model.layers.2.mlp.")]
    d1 = torch.cat([(w["add"][n] - w["base"][n]).flatten() for n in names]).double()
    d2 = torch.cat([(w["reverse"][n] - w["base"][n]).flatten() for n in names]).double()
    both = (d1 != 0) & (d2 != 0)
    group = next(g for g in report["groups"] if g["row"] == "layer 2" and g["kind"] == "mlp")
    assert group["n_params"] == d1.numel()
    assert group["cosine"] == pytest.approx(float(d1 @ d2 / (d1.norm() * d2.norm())), abs=1e-6)
    assert group["conflict"] == pytest.approx(int(((d1 * d2) < 0).sum()) / int(both.sum()), abs=1e-9)
    base_norm = torch.cat([w["base"][n].flatten() for n in names]).double().norm()
    assert group["magnitude_per_model"][0] == pytest.approx(float(d1.norm() / base_norm), rel=1e-5)
    # real fine-tunes of one base: neither identical nor opposed
    layers = _layer_groups(report)
    assert all(-0.9 < g["cosine"] < 0.9 and 0.0 < g["conflict"] < 1.0 for g in layers)


def test_table_summary_and_heatmap(tiny_zoo, tmp_path, capsys):
    config = _config(tmp_path, tiny_zoo / "base", [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")])
    png = tmp_path / "plots" / "audit.png"
    assert main(["audit", str(config), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compatible:")
    assert "layer 3    self_attn" in out and "lm_head" in out
    # the summary takes the branch the per-layer conflict rates call for, and names the worst layers
    conflicts = {g["row"]: g["conflict"] for g in _layer_groups(_audit_json(capsys, config)) if g["kind"] == "all"}
    low, high = min(conflicts.values()), max(conflicts.values())
    if high - low < 0.02:
        assert f"nearly uniform across layers ({low:.2f}-{high:.2f})" in out and "concentrates" not in out
    else:
        worst = max(conflicts, key=conflicts.get).removeprefix("layer ")
        assert "Interference concentrates in layer" in out and "nearly uniform" not in out
        assert f"{worst} (conflict {high:.2f}" in out and f"(range {low:.2f}-{high:.2f})" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_recipe_input(tiny_zoo, tmp_path, capsys):
    import yaml

    (tmp_path / "zoo").symlink_to(tiny_zoo)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": "zoo/base",
                "models": [
                    {"model": "zoo/add", "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": "zoo/reverse", "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": "zoo/base"},
                ],
            }
        )
    )
    report = _audit_json(capsys, recipe, "--sample", "50")
    assert report["models"] == ["add", "reverse"] and report["base"] == "base"
    assert report["sample"] == 50


def test_missing_model_dir_exits_2(tiny_zoo, tmp_path, capsys):
    config = _config(tmp_path, tiny_zoo / "base", [str(tiny_zoo / "add"), "no/such/model"])
    assert main(["audit", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge: error:") and "models[1]" in err and "no/such/model" in err


def test_incompatible_shapes_exit_2(tiny_zoo, tmp_path, capsys):
    bad = _derived(tiny_zoo / "add", tmp_path / "bad", lambda k, v: v[:-1] if k == "lm_head.weight" else v)
    config = _config(tmp_path, tiny_zoo / "base", [str(tiny_zoo / "add"), str(bad)])
    assert main(["audit", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lm_head.weight" in err and "shape" in err


def test_one_model_is_not_enough(tiny_zoo, tmp_path, capsys):
    config = _config(tmp_path, tiny_zoo / "base", [str(tiny_zoo / "add")])
    assert main(["audit", str(config)]) == 2
    assert "at least two models" in capsys.readouterr().err


def test_tensor_groups():
    assert tensor_group("model.embed_tokens.weight") == ("embed", "other")
    assert tensor_group("model.layers.11.self_attn.q_proj.weight") == ("layer 11", "self_attn")
    assert tensor_group("model.layers.0.mlp.down_proj.weight") == ("layer 0", "mlp")
    assert tensor_group("model.layers.0.input_layernorm.weight") == ("layer 0", "other")
    assert tensor_group("model.layers.0.post_attention_layernorm.weight") == ("layer 0", "other")
    assert tensor_group("transformer.h.2.attn.c_attn.weight") == ("layer 2", "self_attn")
    assert tensor_group("model.norm.weight") == ("norm", "other")
    assert tensor_group("lm_head.weight") == ("lm_head", "other")


def test_sample_positions_are_seeded_per_tensor():
    a = sample_positions("model.layers.0.mlp.up_proj.weight", 10_000_000, 1000, seed=0)
    b = sample_positions("model.layers.0.mlp.up_proj.weight", 10_000_000, 1000, seed=0)
    c = sample_positions("model.layers.1.mlp.up_proj.weight", 10_000_000, 1000, seed=0)
    assert a.shape == (1000,) and (a == b).all() and not (a == c).all()
    assert int(a.max()) < 10_000_000
    assert sample_positions("small", 500, 1000, seed=0) is None
