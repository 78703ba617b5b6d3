"""Kernel sets end to end: a recipe records its set, and re-merging it reproduces the exported bytes.

`evomerge merge` uses the set the recipe records (`evomerge.kernels`), else $EVOMERGE_KERNELS, else
evomerge-1; `--kernels` overrides it; the output's recipe.yaml always records the set it was merged with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.merge.recipe import Recipe

SETS = ("evomerge-1", "mergekit-0.1.5")


def _recipe(zoo: Path, tmp: Path, extra: str = "") -> Path:
    """dare_ties in bfloat16: random masks and tied magnitudes, where the two sets differ."""
    path = tmp / "recipe.yaml"
    path.write_text(
        f"merge_method: dare_ties\nbase_model: {zoo}/base\nmodels:\n- model: {zoo}/add\n- model: {zoo}/reverse\n"
        f"parameters: {{weight: 0.6, density: 0.5}}\ndtype: bfloat16\n{extra}"
    )
    return path


def _weights(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))


@pytest.mark.parametrize("kernels", SETS)
def test_exported_recipe_remerges_to_the_same_bytes_whatever_the_environment(tiny_zoo, tmp_path, monkeypatch, kernels):
    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)
    first = tmp_path / "first"
    assert (
        main(["merge", str(_recipe(tiny_zoo, tmp_path)), "--out", str(first), "--kernels", kernels, "--seed", "3"]) == 0
    )
    assert Recipe.load(first / "recipe.yaml").evomerge.kernels == kernels
    monkeypatch.setenv("EVOMERGE_KERNELS", SETS[1 - SETS.index(kernels)])  # the recorded set wins
    again = tmp_path / "again"
    assert main(["merge", str(first / "recipe.yaml"), "--out", str(again)]) == 0
    assert _weights(again) == _weights(first)
    assert Recipe.load(again / "recipe.yaml").evomerge.outputs == Recipe.load(first / "recipe.yaml").evomerge.outputs


def test_the_sets_differ_for_dare_and_a_plain_recipe_gets_the_default(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)
    recipe = _recipe(tiny_zoo, tmp_path)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "plain")]) == 0
    assert Recipe.load(tmp_path / "plain" / "recipe.yaml").evomerge.kernels == "evomerge-1"
    monkeypatch.setenv("EVOMERGE_KERNELS", "mergekit")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "env")]) == 0
    assert Recipe.load(tmp_path / "env" / "recipe.yaml").evomerge.kernels == "mergekit-0.1.5"
    assert _weights(tmp_path / "plain") != _weights(tmp_path / "env")


def test_the_flag_overrides_what_the_recipe_records(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)
    recipe = _recipe(tiny_zoo, tmp_path, extra="evomerge: {seed: 2, kernels: mergekit-0.1.5}\n")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "a"), "--kernels", "evomerge"]) == 0
    assert Recipe.load(tmp_path / "a" / "recipe.yaml").evomerge.kernels == "evomerge-1"
    assert main(["merge", str(recipe), "--out", str(tmp_path / "b")]) == 0
    assert Recipe.load(tmp_path / "b" / "recipe.yaml").evomerge.kernels == "mergekit-0.1.5"
