"""Row coefficients (evomerge-only recipes): the merge scales each model's task-vector rows by the file's values, the
export carries the file beside its recipe, and a file that is not the recorded one is refused."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge.coefficients import FILE_NAME, key, write_coefficients
from evomerge.merge.recipe import Recipe

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def _recipe(zoo, tmp_path, coefficients: dict[str, torch.Tensor]) -> tuple[Recipe, str]:
    digest = write_coefficients(tmp_path / "c.safetensors", coefficients)
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "add"), "parameters": {"weight": 0.7}},
            {"model": str(zoo / "reverse"), "parameters": {"weight": 0.4}},
        ],
        "parameters": {"lambda": 1.1},
        "evomerge": {"seed": 0, "coefficients": {"file": "c.safetensors", "sha256": digest}},
    }
    path = tmp_path / "recipe.yaml"
    Recipe.from_dict(data, base_dir=tmp_path).dump(path)
    return Recipe.load(path), str(path)


def _weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_merge_scales_each_models_task_vector_rows(tiny_zoo, tmp_path):
    base, add, rev = (_weights(tiny_zoo / n) for n in ("base", "add", "reverse"))
    g = torch.Generator().manual_seed(0)
    m_q = torch.rand(base[Q].shape[0], generator=g) * 2
    m_down = torch.rand(base[DOWN].shape[0], generator=g) * 2
    recipe, path = _recipe(tiny_zoo, tmp_path, {key(0, Q): m_q, key(1, DOWN): m_down})
    assert recipe.evomerge_only and recipe.to_yaml().startswith("# evomerge-only")
    assert main(["merge", path, "--out", str(tmp_path / "out")]) == 0
    out = _weights(tmp_path / "out")
    expect_q = base[Q] + 1.1 * (0.7 * m_q[:, None] * (add[Q] - base[Q]) + 0.4 * (rev[Q] - base[Q]))
    expect_down = base[DOWN] + 1.1 * (0.7 * (add[DOWN] - base[DOWN]) + 0.4 * m_down[:, None] * (rev[DOWN] - base[DOWN]))
    torch.testing.assert_close(out[Q], expect_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[DOWN], expect_down, rtol=1e-5, atol=1e-6)
    plain = "model.layers.1.self_attn.v_proj.weight"  # not in the file: the recipe's plain merge
    expect = base[plain] + 1.1 * (0.7 * (add[plain] - base[plain]) + 0.4 * (rev[plain] - base[plain]))
    torch.testing.assert_close(out[plain], expect, rtol=1e-5, atol=1e-6)

    # the export carries the file beside its recipe, named relative to it; merging that recipe gives the same bytes
    written = Recipe.load(tmp_path / "out" / "recipe.yaml")
    assert (tmp_path / "out" / FILE_NAME).is_file() and written.evomerge.coefficients.file == str(
        tmp_path / "out" / FILE_NAME
    )
    assert FILE_NAME in written.evomerge.outputs
    assert main(["merge", str(tmp_path / "out" / "recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert _weights(tmp_path / "again").keys() == out.keys()
    assert all(torch.equal(_weights(tmp_path / "again")[k], v) for k, v in out.items())


def test_a_coefficient_file_whose_hash_differs_is_refused_on_merge(tiny_zoo, tmp_path, capsys):
    recipe, path = _recipe(tiny_zoo, tmp_path, {key(0, Q): torch.ones(32)})
    data = bytearray((tmp_path / "c.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one coefficient
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    assert main(["merge", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge: error:") and "evomerge.coefficients.sha256" in err and "c.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_coefficients_of_the_wrong_shape_are_refused(tiny_zoo, tmp_path, capsys):
    recipe, path = _recipe(tiny_zoo, tmp_path, {key(1, Q): torch.ones(7)})
    assert main(["merge", path, "--out", str(tmp_path / "out")]) == 2
    assert "one coefficient per row" in capsys.readouterr().err and not (tmp_path / "out").exists()
