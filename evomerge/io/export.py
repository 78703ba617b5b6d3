"""Stream a recipe's merge to an HF checkpoint folder: sharded safetensors, config, tokenizer, recipe.yaml.

    export_recipe(Recipe.load("recipe.yaml"), Path("out/model"))

Memory stays bounded (one shard of merged tensors; inputs are memory-mapped). Everything is written to a
temp folder next to `out_dir` and renamed into place: `out_dir` holds the previous complete result or the
new one, never a partial one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from evomerge.io.checkpoint import Checkpoint, check_compatible
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip


class ShardWriter:
    """Collects tensors into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""

    def __init__(self, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, str(self._part(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.folder / f".part-{index:05d}.safetensors"

    def finish(self) -> list[Path]:
        """Name the shards HF's way; write model.safetensors.index.json when there is more than one."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = [self.folder / "model.safetensors"]
        else:
            final = [self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, path in enumerate(final):
            os.replace(self._part(i), path)
        if n > 1:
            weight_map = {name: final[i].name for i, names in enumerate(self._shards) for name in names}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def export_recipe(
    recipe: Recipe,
    out_dir: Path | str,
    *,
    seed: int | None = None,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Merge `recipe` to `out_dir` (HF folder + recipe.yaml with provenance); returns `out_dir`."""
    from evomerge import __version__
    from evomerge.merge.materialize import merged_tensors

    out_dir = Path(out_dir)
    if seed is not None:
        recipe = recipe.with_provenance(seed=seed)
    inputs = recipe.input_models()
    checkpoints = [Checkpoint(m, allow_pickle=allow_pickle) for m in inputs]
    ref = checkpoints[inputs.index(recipe.base_model)] if recipe.base_model else checkpoints[0]
    check_compatible([ref] + [c for c in checkpoints if c is not ref])  # mismatches named against the base
    recipe = recipe.with_provenance(version=__version__, inputs={m: c.sha256() for m, c in zip(inputs, checkpoints)})
    tokenizer_dir = _tokenizer_dir(recipe, ref)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        writer = ShardWriter(tmp, shard_bytes)
        out_dtype = None
        for name, tensor in merged_tensors(recipe, checkpoints):
            writer.add(name, tensor)
            if tensor.is_floating_point():
                out_dtype = out_dtype or str(tensor.dtype).removeprefix("torch.")
        shards = writer.finish()
        config = dict(ref.config)
        if out_dtype:
            config["dtype"] = out_dtype
            config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname in TOKENIZER_FILES:
            src = (ref.path if fname == "generation_config.json" else tokenizer_dir) / fname
            if src.is_file():
                shutil.copyfile(src, tmp / fname)
        recipe.dump(tmp / "recipe.yaml")
        _open_permissions(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"{len(shards)} shard(s), {writer.total_bytes / 1e6:.1f} MB")
    return out_dir


def _tokenizer_dir(recipe: Recipe, ref: Checkpoint) -> Path:
    source = recipe.tokenizer_source
    if source in (None, "base", "union"):  # inputs share one vocabulary (checked), so "union" is the base's
        return ref.path
    path = Path(source)
    if not path.is_dir():
        from evomerge.errors import ConfigError

        raise ConfigError(f"field tokenizer_source: {source} is not a folder")
    return path


def _open_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the result the usual umask-based modes."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
