"""`evomerge verify`: exported checkpoints carry the sha256 of every file they hold, and are checked against it.

The failing cases (tampered, missing, extra weight file, no recipe) live in tests/test_bad_input.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from evomerge.cli import main
from evomerge.io.digest import file_sha256
from evomerge.io.verify import verify_checkpoint
from evomerge.merge.recipe import Recipe


def _recipe(zoo: Path, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        f"merge_method: della\nbase_model: {zoo}/base\nmodels:\n- model: {zoo}/add\n- model: {zoo}/reverse\n"
        "parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}\nevomerge: {seed: 9}\n"
    )
    return path


def test_export_records_every_output_and_verify_checks_them(tiny_zoo, tmp_path, capsys):
    assert main(["merge", str(_recipe(tiny_zoo, tmp_path)), "--out", str(tmp_path / "a")]) == 0
    outputs = Recipe.load(tmp_path / "a" / "recipe.yaml").evomerge.outputs
    files = {p.name for p in (tmp_path / "a").iterdir()} - {"recipe.yaml"}
    assert set(outputs) == files >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert all(outputs[f] == file_sha256(tmp_path / "a" / f) for f in files)
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("ok: all") and f"ok  model.safetensors  sha256:{outputs['model.safetensors']}" in lines
    assert len(lines) == len(files) + 1


def test_the_exported_recipe_reproduces_the_same_hashes(tiny_zoo, tmp_path, capsys):
    """Decision 2 checked through the hashes: merging an exported recipe gives the files it recorded."""
    assert (
        main(["merge", str(_recipe(tiny_zoo, tmp_path)), "--out", str(tmp_path / "a"), "--max-shard-size", "20KB"]) == 0
    )
    assert (
        main(["merge", str(tmp_path / "a" / "recipe.yaml"), "--out", str(tmp_path / "b"), "--max-shard-size", "20KB"])
        == 0
    )
    a, b = (Recipe.load(tmp_path / d / "recipe.yaml").evomerge for d in "ab")
    assert a.outputs == b.outputs and len([f for f in a.outputs if f.endswith(".safetensors")]) > 1
    assert "warning" not in capsys.readouterr().err


def test_verify_an_export_folder_and_warn_on_changed_inputs(tiny_zoo, tmp_path, capsys):
    assert main(["merge", str(_recipe(tiny_zoo, tmp_path)), "--out", str(tmp_path / "best" / "model")]) == 0
    shutil.copyfile(tmp_path / "best" / "model" / "recipe.yaml", tmp_path / "best" / "recipe.yaml")
    (tmp_path / "best" / "model" / "README.md").write_text("model card, written after export")  # not a weight: ignored
    assert [n for n, _ in verify_checkpoint(tmp_path / "best")] == [
        n for n, _ in verify_checkpoint(tmp_path / "best" / "model")
    ]
    # the recipe names its inputs' sha256: a changed input is merged, but the user is told
    text = (tmp_path / "best" / "recipe.yaml").read_text()
    digest = Recipe.load(tmp_path / "best" / "recipe.yaml").evomerge.inputs[f"{tiny_zoo}/add"]
    (tmp_path / "edited.yaml").write_text(text.replace(digest, "f" * 64))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "edited.yaml"), "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert f"{tiny_zoo}/add: weights differ from the sha256 recorded" in err


def test_extra_files_are_part_of_the_atomic_output(tiny_zoo, tmp_path):
    from evomerge.export.export import export_recipe

    out = export_recipe(Recipe.load(_recipe(tiny_zoo, tmp_path)), tmp_path / "m", extra_files={"README.md": "# card\n"})
    assert (out / "README.md").read_text() == "# card\n"
    assert "README.md" in dict(verify_checkpoint(out))
