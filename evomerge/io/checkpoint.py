"""Read HF checkpoints lazily: memory-mapped safetensors (one file or sharded), pickles only on request.

ckpt = Checkpoint("zoo/add")
ckpt.get("model.layers.0.mlp.up_proj.weight")   # a tensor backed by the mapped file, no copy
check_compatible([Checkpoint("zoo/base"), ckpt])
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ModelError, first_line
from evomerge.io.digest import files_sha256

if TYPE_CHECKING:
    import torch

_ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


# torch dtype name -> safetensors dtype code (what a writer puts in the header)
ST_CODES: dict[str, str] = {name: code for code, (name, _) in _ST_DTYPES.items()}
# A tokenizer's own files (transformers' save_pretrained writes some of these): copied into exports, and a model
# folder scored from disk needs at least one of them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def config_num_layers(config: dict[str, Any]) -> int | None:
    """The decoder-layer count of an HF `config.json` (also a multimodal model's `text_config`), or None."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


class _Entry:
    __slots__ = ("file", "dtype", "shape", "start", "end")

    def __init__(self, file: Path, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


class Checkpoint:
    """One model folder: config, tensor index (names, shapes, dtypes) and lazily mapped tensors."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is not a folder" if self.path.exists() else "not found"
            raise ModelError(
                f"{self.path}: model folder {what}; fix the path (relative paths resolve from the recipe's folder)"
            )
        config_file = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{config_file}: missing; a model folder needs config.json next to its weights") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{config_file}: unreadable ({exc})") from None
        self.files = self._weight_files(allow_pickle)
        self._entries: dict[str, _Entry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if self.files[0].suffix == ".safetensors":
            for file in self.files:
                for name, entry in _read_header(file).items():
                    self._entries.setdefault(name, entry)
        else:
            self._pickled = load_pickles(self.files)

    # ---- discovery ------------------------------------------------------------------------------
    def _weight_files(self, allow_pickle: bool) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return self._from_index(index)
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(self.path.glob("*.bin")) + sorted(self.path.glob("*.pt"))
        pickle_index = self.path / "pytorch_model.bin.index.json"
        if not pickles and not pickle_index.is_file():
            raise ModelError(f"{self.path}: no weights found; put the model's *.safetensors files in this folder")
        if not allow_pickle:
            raise ModelError(
                f"{self.path}: weights are a pickle checkpoint (.bin/.pt), which can run code when loaded; "
                "convert it to safetensors or pass --allow-pickle"
            )
        return self._from_index(pickle_index) if pickle_index.is_file() else pickles

    def _from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: unreadable shard index ({exc})") from None
        files = sorted({self.path / name for name in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise ModelError(f"{index}: lists shard {file.name}, which is missing")
        return files

    # ---- tensors --------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in (self._pickled if self._pickled is not None else self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._tensor_or_raise(name).shape)
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        import torch

        if self._pickled is not None:
            return self._tensor_or_raise(name).dtype
        return getattr(torch, _ST_DTYPES[self._entry(name).dtype][0])

    def get(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor, backed by the mapped file (read-only by contract: never modify it in place); with `device`,
        a copy there (the CPU: the mapped tensor itself)."""
        tensor = self._get(name)
        return tensor if device is None else tensor.to(device)

    def _get(self, name: str) -> torch.Tensor:
        import torch

        if self._pickled is not None:
            return self._tensor_or_raise(name)
        entry = self._entry(name)
        dtype = getattr(torch, _ST_DTYPES[entry.dtype][0])
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        buf = self._map(entry.file)
        if entry.start % _ST_DTYPES[entry.dtype][1]:  # unaligned (old writers): copy this one tensor
            return torch.frombuffer(bytearray(buf[entry.start : entry.end]), dtype=dtype).reshape(entry.shape)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=entry.start).reshape(entry.shape)

    def nbytes(self) -> int:
        """Bytes of every tensor as stored (from the headers; no weight is read)."""
        if self._pickled is not None:
            return sum(t.numel() * t.element_size() for t in self._pickled.values())
        return sum(e.end - e.start for e in self._entries.values())

    def release(self, name: str) -> None:
        """Drop the mapped pages of `name` from this process's memory (the page cache keeps them).

        Tensors already handed out stay valid: their pages are read back from the file when touched.
        """
        if self._pickled is not None or name not in self._entries:
            return
        entry = self._entries[name]
        buf = self._maps.get(entry.file)
        if buf is None:
            return
        page = mmap.PAGESIZE
        start, end = -(-entry.start // page) * page, entry.end // page * page  # whole pages inside the tensor
        if end > start:
            buf.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelError(f"{self.path}: has no tensor {name!r}") from None

    def _tensor_or_raise(self, name: str) -> torch.Tensor:
        try:
            return self._pickled[name]  # type: ignore[index]
        except KeyError:
            raise ModelError(f"{self.path}: has no tensor {name!r}") from None

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as fh:
                # private copy-on-write mapping: writable for torch.frombuffer, shared pages until written
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    # ---- identity -------------------------------------------------------------------------------
    @cached_property
    def _sha256(self) -> str:
        return files_sha256(sorted(self.files))

    def sha256(self) -> str:
        """Hash of the weight files' bytes in name order (the zoo's `zoo.json` uses the same definition)."""
        return self._sha256

    @property
    def num_layers(self) -> int | None:
        return config_num_layers(self.config)

    @property
    def model_dir(self) -> Path:
        """The folder of this model's config.json and tokenizer (its own)."""
        return self.path

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @cached_property
    def _vocab(self) -> dict[str, int] | None:
        tok = self.path / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            try:  # the library that wrote the file reads it: every model type, added tokens included
                return Tokenizer.from_file(str(tok)).get_vocab(with_added_tokens=True)
            except Exception as err:  # tokenizers raises a bare Exception for a file it cannot read
                why = first_line(err)
                raise ModelError(f"{tok}: cannot read the tokenizer ({why}); re-download or re-export it") from None
        vocab_file = self.path / "vocab.json"
        if vocab_file.is_file():
            return json.loads(vocab_file.read_text(encoding="utf-8"))
        return None

    def vocab(self) -> dict[str, int] | None:
        """token -> id from tokenizer.json (or vocab.json); None when the folder has neither."""
        return self._vocab

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"


def _read_header(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
            if dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
            if end - start != math.prod(shape) * _ST_DTYPES[dtype][1] or start < 0:
                raise ValueError(f"tensor {name!r} has offsets that do not match its shape")
            if 8 + n + end > size:
                raise EOFError(f"truncated: tensor {name!r} ends at byte {8 + n + end}, file has {size}")
            entries[name] = _Entry(file, dtype, shape, 8 + n + start, 8 + n + end)
        return entries
    except EOFError as exc:
        raise ModelError(f"{file}: {exc}; re-download or re-export it") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file}: corrupt safetensors header ({exc}); re-download or re-export it") from None


def load_pickles(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ModelError(f"{file}: cannot load pickle checkpoint ({type(exc).__name__}: {exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"{file}: not a state dict of tensors")
        for name, tensor in state.items():
            tensors.setdefault(name, tensor)
    return tensors


# Shape-defining config.json fields: (the name in messages, the keys architectures spell it with)
SHAPE_FIELDS = (
    ("model_type", ("model_type",)),
    ("architectures", ("architectures",)),
    ("hidden_size", ("hidden_size", "n_embd", "d_model")),
    ("num_hidden_layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("num_attention_heads", ("num_attention_heads", "n_head")),
    ("num_key_value_heads", ("num_key_value_heads",)),
    ("intermediate_size", ("intermediate_size", "n_inner", "ffn_dim")),
    ("vocab_size", ("vocab_size",)),
)


def config_field(config: dict[str, Any], field: str) -> tuple[str, Any]:
    """(key, value) of a shape-defining field in an HF config (or its `text_config`); value None when absent.
    An absent num_key_value_heads is num_attention_heads (no grouped-query attention), as transformers reads it."""
    keys = dict(SHAPE_FIELDS)[field]
    for cfg in (config, config.get("text_config") or {}):
        for key in keys:
            if key in cfg:
                return key, cfg[key]
    if field == "num_key_value_heads":
        return config_field(config, "num_attention_heads")
    return keys[0], None


def _show(value: Any) -> str:
    if value is None:
        return "absent"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


VOCAB_HINT = (
    "merge them with `tokenizer_source: union` (or `base`, or a model folder) in the recipe or search config, "
    "which lays each model's embedding rows out in one output vocabulary"
)


TRUNCATE_HINT = (
    "or, where the extra rows are padding under one tokenizer, `evomerge merge --unsafe-truncate-embeddings` (keeps "
    "the first rows, as mergekit's option of that name does)"
)


def config_mismatch(
    ref: Checkpoint | tuple[Path, dict],
    other: Checkpoint | tuple[Path, dict],
    *,
    layers: bool = True,
    vocab: bool = True,
) -> str | None:
    """The first shape-defining config.json field on which `other` differs from `ref`, as a message; None if none.
    Each is a Checkpoint (or a LoRA adapter's reader) or a (folder, config) pair (a config.json read without the
    weights). `layers=False` leaves num_hidden_layers out (a `slices:` recipe takes layer ranges from models of any
    depth); `vocab=False` leaves vocab_size out (a `tokenizer_source` merge aligns the vocabularies)."""
    ref_path, ref_config = ref if isinstance(ref, tuple) else (ref.path, ref.config)
    other_path, other_config = other if isinstance(other, tuple) else (other.path, other.config)
    for field, _ in SHAPE_FIELDS:
        if (field == "num_hidden_layers" and not layers) or (field == "vocab_size" and not vocab):
            continue
        _, a = config_field(ref_config, field)
        other_key, b = config_field(other_config, field)
        if a != b:
            fix = (
                f"{VOCAB_HINT}, {TRUNCATE_HINT}, "
                if field == "vocab_size"
                else "merge models of one architecture and size, "
            )
            return (
                f"{other_path}: config.json {other_key} is {_show(b)}, but {ref_path} has {_show(a)}; {fix}or pass "
                "--allow-config-mismatch (search config: allow_config_mismatch: true) if their tensors are meant to "
                "merge anyway"
            )
    return None


def vocab_rows(checkpoint: Checkpoint) -> int | None:
    """Rows of the model's embeddings and head: config.json vocab_size (None when absent)."""
    _, value = config_field(checkpoint.config, "vocab_size")
    return value if isinstance(value, int) else None


def check_compatible(
    checkpoints: Sequence[Checkpoint],
    *,
    allow_config_mismatch: bool = False,
    layers: bool = True,
    vocab_may_differ: bool = False,
    truncate: bool = False,
) -> None:
    """Same shape-defining config (`SHAPE_FIELDS`, unless `allow_config_mismatch`), tensor names, shapes and tokenizer
    vocabulary as `checkpoints[0]` (put the base first), or ModelError naming the first mismatch. `layers=False`
    (a `slices:` recipe) compares the config and the vocabulary only: the slices decide which tensors are read,
    and the merge checks them tensor by tensor. `vocab_may_differ` (a `tokenizer_source` merge, or the audit):
    vocab_size, the tokenizers and the embedding and head rows may differ; `truncate` (`--unsafe-truncate-embeddings`):
    so may the rows of any tensor (the merge keeps the fewest, outside the decoder layers only)."""
    if not checkpoints:
        raise ModelError("no input models to merge")
    ref = checkpoints[0]
    ref_names = ref.tensor_names()
    ref_set = set(ref_names)
    for other in checkpoints[1:]:
        why = None if allow_config_mismatch else config_mismatch(ref, other, layers=layers, vocab=not vocab_may_differ)
        if why is not None:
            raise ModelError(why)
        if not layers:
            if not vocab_may_differ:
                _check_vocab(ref, other)
            continue
        names = set(other.tensor_names())
        missing = [n for n in ref_names if n not in names]
        if missing:
            raise ModelError(f"{other.path}: tensor {missing[0]} is missing (present in {ref.path})")
        extra = [n for n in other.tensor_names() if n not in ref_set]
        if extra:
            raise ModelError(f"{other.path}: has tensor {extra[0]}, which {ref.path} lacks")
        for name in ref_names:
            rows_only = _rows_only(ref, other, name) or (truncate and _first_dim_only(ref, other, name))
            if other.shape(name) != ref.shape(name) and not (vocab_may_differ and rows_only):
                hint = f"; {VOCAB_HINT}" if _rows_only(ref, other, name) else ""
                raise ModelError(
                    f"{other.path}: tensor {name} has shape {list(other.shape(name))}, "
                    f"but {ref.path} has {list(ref.shape(name))}{hint}"
                )
        if not vocab_may_differ:
            _check_vocab(ref, other)


def _rows_only(ref: Checkpoint, other: Checkpoint, name: str) -> bool:
    """Whether tensor `name` differs between the two only in its vocabulary rows (an embedding or head: its first
    dimension is each model's vocab_size)."""
    a, b = ref.shape(name), other.shape(name)
    return bool(a) and a[1:] == b[1:] and a[0] == vocab_rows(ref) and b[0] == vocab_rows(other)


def _first_dim_only(ref: Checkpoint, other: Checkpoint, name: str) -> bool:
    """Whether tensor `name` differs between the two only in its first dimension (the merge refuses it inside a
    decoder layer: export's truncation check)."""
    a, b = ref.shape(name), other.shape(name)
    return bool(a) and len(a) == len(b) and a[1:] == b[1:]


def _check_vocab(ref: Checkpoint, other: Checkpoint) -> None:
    a, b = ref.vocab(), other.vocab()
    if a is not None and b is not None and a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))
        hint = f" (first difference: token {diff[0][0]!r})" if diff else ""
        raise ModelError(f"{other.path}: tokenizer vocabulary differs from {ref.path}{hint}; {VOCAB_HINT}")
