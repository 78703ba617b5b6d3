"""Check an exported checkpoint against the sha256 its recipe recorded (`evomerge.outputs`).

    for name, digest in verify_checkpoint("out/model"):   # ModelError naming the first bad file
        print("ok", name, digest)

Export records every file it writes next to recipe.yaml (weights, shard index, config, tokenizer), so a
copied, truncated or tampered checkpoint is caught before anyone loads or publishes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.errors import ModelError
from evomerge.io.digest import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_folder(folder: Path | str) -> Path:
    """`folder` itself, or its `model/` subfolder for an export folder (`runs/<name>/best`)."""
    folder = Path(folder)
    if not (folder / "config.json").exists() and (folder / "model" / "recipe.yaml").is_file():
        return folder / "model"
    return folder


def verify_checkpoint(folder: Path | str) -> list[tuple[str, str]]:
    """[(file, sha256)] of every recorded file, all matching; else ModelError naming the first bad file."""
    from evomerge.merge.recipe import Recipe

    folder = checkpoint_folder(folder)
    if not folder.is_dir():
        raise ModelError(
            f"{folder}: folder not found; pass the folder `evomerge merge --out` or `evomerge export` wrote"
        )
    recipe_file = folder / "recipe.yaml"
    if not recipe_file.is_file():
        raise ModelError(
            f"{recipe_file}: missing; only checkpoints exported by evomerge (with their recipe) can be verified"
        )
    recipe = Recipe.load(recipe_file)
    recorded = recipe.evomerge.outputs if recipe.evomerge is not None else {}
    if not recorded:
        raise ModelError(
            f"{recipe_file}: field evomerge.outputs is missing (exported before evomerge recorded output hashes); "
            f"re-export with `evomerge merge {recipe_file} --out DIR`"
        )
    checked = []
    for name, expected in recorded.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or os.sep in name:
            raise ModelError(
                f"{recipe_file}: field evomerge.outputs lists {name!r}, which is not a file of this folder"
            )
        if not path.is_file():
            raise ModelError(f"{path}: missing (recorded in {recipe_file}); the checkpoint is incomplete, re-export it")
        actual = file_sha256(path)
        if actual != expected:
            raise ModelError(
                f"{path}: sha256 {actual[:12]}... differs from {expected[:12]}... recorded in {recipe_file}; "
                "the file was modified or damaged, re-export it"
            )
        checked.append((name, actual))
    for path in sorted(folder.iterdir()):
        if path.name not in recorded and (path.name.endswith(WEIGHT_SUFFIXES) or path.name in WEIGHT_INDEXES):
            raise ModelError(
                f"{path}: weight file not recorded in {recipe_file}; remove it or re-export the checkpoint"
            )
    return checked
