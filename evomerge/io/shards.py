"""Stream tensors into safetensors shards, HF's way (`model.safetensors`, or `model-0000i-of-0000n` + index).

    writer = ShardWriter(folder, [(name, shape), ...], shard_bytes=parse_size("2GB"))
    for name, tensor in tensors: writer.add(name, tensor)      # written at once: no shard is held in memory
    writer.finish()

Only writing: what goes in (a merge, by `evomerge.export.export`) and where the folder is published (`io.atomic`)
are the caller's.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from evomerge.errors import ConfigError
from evomerge.io.checkpoint import ST_CODES

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Streams tensors into safetensors shards of at most `shard_bytes` (a larger tensor gets a shard of its own).

    Each tensor's bytes go to the current shard file as it arrives, so no shard is ever held in memory.
    `layout` ((name, shape) of every tensor that may come) bounds the JSON header, whose room is reserved
    at the start of each file and filled in when the shard closes; the spare room is trailing spaces, which
    the safetensors format allows.
    """

    def __init__(
        self, folder: Path, layout: Sequence[tuple[str, Sequence[int]]], shard_bytes: int = DEFAULT_SHARD_BYTES
    ):
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
            "dtype": ST_CODES[str(data.dtype).removeprefix("torch.")],
            "shape": list(data.shape),
            "data_offsets": [self._offset, self._offset + size],
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


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KiB', '1000' -> bytes (for --max-shard-size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: use a positive size such as 2GB, 500MB or 1000000")
    base = 1024 if match.group(3) else 1000
    power = " KMGT".index(match.group(2).upper() or " ")
    return max(1, int(float(match.group(1)) * base**power))
