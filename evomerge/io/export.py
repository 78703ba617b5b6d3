"""Stream a recipe's merge to an HF checkpoint folder: sharded safetensors, config, tokenizer, recipe.yaml.

    export_recipe(Recipe.load("recipe.yaml"), Path("out/model"))

Memory stays bounded: inputs are memory-mapped and each tensor's input pages are released once it is
merged, and each merged tensor is written to its shard file at once (no shard is held in memory).
Everything is written to a temp folder next to `out_dir` and swapped into place (`evomerge.io.atomic`):
`out_dir` holds the previous complete result or the new one, never a partial one, even if the process is
killed. The recipe written next to the weights records the sha256 of every other file (`evomerge.outputs`)
for `evomerge verify`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Mapping, Sequence

from evomerge.errors import ConfigError, EvomergeError
from evomerge.io.atomic import atomic_dir, check_replaceable
from evomerge.io.checkpoint import ST_CODES, Checkpoint, check_compatible
from evomerge.io.verify import file_sha256
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip


class ShardWriter:
    """Streams tensors into safetensors shards of at most `shard_bytes` (a larger tensor gets a shard of its own).

    Each tensor's bytes go to the current shard file as it arrives, so no shard is ever held in memory.
    `layout` ((name, shape) of every tensor that may come) bounds the JSON header, whose room is reserved
    at the start of each file and filled in when the shard closes; the spare room is trailing spaces, which
    the safetensors format allows.
    """

    def __init__(self, folder: Path, layout: Sequence[tuple[str, Sequence[int]]], shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self._room = _header_room(layout)
        self._known = {name for name, _ in layout}
        self._fh: BinaryIO | None = None
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if name not in self._known:
            raise ValueError(f"tensor {name} is not in the writer's layout")
        data = tensor.detach().contiguous()
        size = data.numel() * data.element_size()
        if self._fh is not None and self._entries and self._offset + size > self.shard_bytes:
            self._close()
        if self._fh is None:
            self._fh = open(self._part(len(self._shards)), "wb")
            self._fh.seek(8 + self._room)
        if size:
            self._fh.write(data.view(torch.uint8).reshape(-1).numpy().data)
        self._entries[name] = {
            "dtype": ST_CODES[str(data.dtype).removeprefix("torch.")], "shape": list(data.shape), "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size
        self.total_bytes += size

    def _close(self) -> None:
        assert self._fh is not None
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self._room:  # cannot happen for tensors of the layout; never write a broken file
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds its reserved {self._room}")
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self._room) + header + b" " * (self._room - len(header)))
        self._fh.close()
        self._fh = None
        self._shards.append(list(self._entries))
        self._entries, self._offset = {}, 0

    def _part(self, index: int) -> Path:
        return self.folder / f".part-{index:05d}.safetensors"

    def finish(self) -> list[Path]:
        """Name the shards HF's way; write model.safetensors.index.json when there is more than one."""
        if self._fh is None and not self._shards:  # no tensors at all: one empty shard
            self._fh = open(self._part(0), "wb")
        if self._fh is not None:
            self._close()
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


def _header_room(layout: Sequence[tuple[str, Sequence[int]]]) -> int:
    """Bytes that hold the JSON header of any shard of `layout` (largest dtype name, 20-digit offsets)."""
    widest = {"dtype": "F8_E4M3", "data_offsets": [10**20, 10**20]}
    size = len(json.dumps({"__metadata__": {"format": "pt"}}, separators=(",", ":")))
    for name, shape in layout:
        entry = json.dumps({name: {**widest, "shape": list(shape)}}, separators=(",", ":"))
        size += len(entry)  # its braces pay for the comma between entries
    return -(-size // 8) * 8  # tensor data 8-byte aligned


def export_recipe(
    recipe: Recipe,
    out_dir: Path | str,
    *,
    seed: int | None = None,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    source: str | os.PathLike | None = None,
    extra_files: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Merge `recipe` to `out_dir` (HF folder + recipe.yaml with provenance); returns `out_dir`.

    Raises EvomergeError (exit 2) for bad inputs or an output that cannot be written, and then leaves
    nothing behind. `source` (the recipe's file) prefixes errors about the models the recipe names.
    `extra_files` ({name: text}, e.g. a model card) are written inside the same atomic swap and recorded.
    """
    from evomerge import __version__
    from evomerge.merge.materialize import merged_tensors

    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # fail before hashing and merging
    if seed is not None:
        recipe = recipe.with_provenance(seed=seed)
    inputs = recipe.input_models()
    checkpoints = [_open(recipe, m, allow_pickle, source) for m in inputs]
    ref = checkpoints[inputs.index(recipe.base_model)] if recipe.base_model else checkpoints[0]
    check_compatible([ref] + [c for c in checkpoints if c is not ref])  # mismatches named against the base
    # the kernel set is always recorded, so a re-merge gives these bytes whatever its environment
    recipe = recipe.with_provenance(version=__version__, kernels=recipe.kernels, outputs={})
    tokenizer_dir = _tokenizer_dir(recipe, ref)
    hashing = ThreadPoolExecutor(len(checkpoints))  # the inputs' sha256 while they merge (hashlib frees the GIL)
    digests = [hashing.submit(c.sha256) for c in checkpoints]

    with _finally_shutdown(hashing), atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, [(n, ref.shape(n)) for n in ref.tensor_names()], shard_bytes)
        out_dtype = None
        for name, tensor in merged_tensors(recipe, checkpoints):
            writer.add(name, tensor)
            if tensor.is_floating_point():
                out_dtype = out_dtype or str(tensor.dtype).removeprefix("torch.")
            del tensor
            for ckpt in checkpoints:  # done with this tensor's input pages: drop them from our memory
                ckpt.release(name)
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
        for fname, text in (extra_files or {}).items():
            if Path(fname).name != fname or fname == "recipe.yaml":
                raise ValueError(f"extra file {fname!r}: a plain file name other than recipe.yaml")
            (tmp / fname).write_text(text, encoding="utf-8")
        outputs = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        recipe = recipe.with_provenance(inputs={m: d.result() for m, d in zip(inputs, digests)})
        recipe.with_provenance(outputs=outputs).dump(tmp / "recipe.yaml")
    if log:
        log(f"{len(shards)} shard(s), {writer.total_bytes / 1e6:.1f} MB")
    return out_dir


@contextmanager
def _finally_shutdown(pool: ThreadPoolExecutor) -> Iterator[None]:
    try:
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _open(recipe: Recipe, model: str, allow_pickle: bool, source: str | os.PathLike | None) -> Checkpoint:
    """The input checkpoint; errors also name the recipe file and field that point at it."""
    try:
        return Checkpoint(model, allow_pickle=allow_pickle)
    except EvomergeError as exc:
        where = f"{source}: " if source is not None else ""
        raise type(exc)(f"{where}field {recipe.field_of(model)}: {exc}") from None


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KiB', '1000' -> bytes (for --max-shard-size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: use a positive size such as 2GB, 500MB or 1000000")
    base = 1024 if match.group(3) else 1000
    power = " KMGT".index(match.group(2).upper() or " ")
    return max(1, int(float(match.group(1)) * base**power))


def _tokenizer_dir(recipe: Recipe, ref: Checkpoint) -> Path:
    source = recipe.tokenizer_source
    if source in (None, "base", "union"):  # inputs share one vocabulary (checked), so "union" is the base's
        return ref.path
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"field tokenizer_source: {source} is not a folder; point it at a folder with tokenizer.json")
    return path
