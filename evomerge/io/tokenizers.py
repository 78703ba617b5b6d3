"""Read a model folder's tokenizer as a vocabulary, and build and write the output tokenizer of a merge.

    vocab = read_vocab("zoo/add", rows=47)            # evomerge.merge.vocab.Vocab: tokens, added tokens, rows
    tok = output_tokenizer(plan, "zoo/base")          # the tokenizer a `tokenizer_source` merge writes
    tok.save_pretrained(out_dir)

Tokenizers are read with transformers' AutoTokenizer (fast, never remote code), as mergekit reads them, so the
ids and added-token settings are the ones the models were trained with. The vocabulary arithmetic itself is in
`evomerge.merge.vocab` and never touches a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ModelError
from evomerge.merge.vocab import AddedSpec, Vocab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from evomerge.merge.vocab import VocabPlan


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The folder's tokenizer (fast; local files only; no remote code), or ModelError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for an unreadable tokenizer
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"{folder}: cannot load its tokenizer ({type(exc).__name__}: {first}); a tokenizer_source merge needs "
            "each model's tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None


def has_tokenizer(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def vocab_of(tokenizer: PreTrainedTokenizerBase, rows: int) -> Vocab:
    """A loaded tokenizer's vocabulary (token -> id), its added tokens in id order, and the model's `rows`."""
    added = {
        info.content: _spec(info) for _, info in sorted(tokenizer.added_tokens_decoder.items(), key=lambda kv: kv[0])
    }
    return Vocab(tokens=dict(tokenizer.get_vocab()), added=added, rows=rows)


def read_vocab(folder: str | os.PathLike, rows: int) -> Vocab:
    """The vocabulary of the tokenizer in `folder`; `rows`: the model's embedding rows (config.json vocab_size)."""
    return vocab_of(load_tokenizer(folder), rows)


def input_vocabs(inputs: Mapping[str, Any]) -> dict[str, Vocab]:
    """{model: its Vocab} of opened inputs (Checkpoint or LoraCheckpoint, recipe order), each tokenizer folder read
    once; a model folder without tokenizer files has the first input's tokenizer (mergekit assumes the base's)."""
    from evomerge.io.checkpoint import vocab_rows

    loaded: dict[Path, Any] = {}
    fallback = None
    out = {}
    for model, ckpt in inputs.items():
        folder = Path(ckpt.model_dir)
        if folder not in loaded and has_tokenizer(folder):
            loaded[folder] = load_tokenizer(folder)
        tokenizer = loaded.get(folder, fallback)
        if tokenizer is None:
            raise ModelError(f"{folder}: no tokenizer files (tokenizer.json); a tokenizer_source merge reads them")
        fallback = fallback or tokenizer
        rows = vocab_rows(ckpt)
        out[model] = vocab_of(tokenizer, rows if rows is not None else len(tokenizer.get_vocab()))
    return out


def vocab_plan_for(
    source: str, inputs: Mapping[str, Any], base: str | None, *, field: str = "tokenizer_source"
) -> VocabPlan:
    """The vocabulary plan of `tokenizer_source: source` over opened `inputs` ({model: checkpoint}, recipe order;
    `base`: the base model, or None for the first input), with the reference's vocabulary tensors named."""
    from dataclasses import replace

    from evomerge.io.checkpoint import vocab_rows
    from evomerge.merge.vocab import SOURCES, is_vocab_tensor, plan_vocab

    base = base if base is not None else next(iter(inputs))
    folder = None
    source_vocab = None
    if source not in SOURCES:
        if not has_tokenizer(source):
            raise ModelError(
                f"field {field}: {source} is not a folder with a tokenizer (tokenizer.json); use union, base or "
                "a model folder"
            )
        folder = str(source)
        tokenizer = load_tokenizer(folder)
        source_vocab = vocab_of(tokenizer, len(tokenizer.get_vocab()))
    plan = plan_vocab(source, base, input_vocabs(inputs), source_vocab, folder)
    ref = inputs[base]
    rows = vocab_rows(ref)
    tensors = frozenset(n for n in ref.tensor_names() if is_vocab_tensor(n, ref.shape(n), rows or -1))
    if not tensors:
        raise ModelError(
            f"{ref.model_dir}: no embedding or head tensor with {rows} rows (config.json vocab_size) was found; "
            f"{field} needs the vocabulary tensors (embed_tokens, lm_head, ...)"
        )
    return replace(plan, tensors=tensors)


def output_tokenizer(plan: VocabPlan, base_folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The merge's tokenizer: the base's with `plan.additions` added in order (`union`), the base's (`base`) or the
    named folder's; ModelError if transformers numbers the result otherwise than the plan (a tokenizer whose ids
    have gaps)."""
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(plan.folder or base_folder)
    for spec in plan.additions:
        if isinstance(spec, str):  # a main-vocabulary token of another model: added as mergekit adds it, by its text
            tokenizer.add_tokens(spec)
            continue
        tokenizer.add_tokens(
            AddedToken(
                spec.content,
                single_word=spec.single_word,
                lstrip=spec.lstrip,
                rstrip=spec.rstrip,
                normalized=spec.normalized,
                special=spec.special,
            )
        )
    if dict(tokenizer.get_vocab()) != dict(plan.tokens):
        raise ModelError(
            f"{plan.folder or base_folder}: its tokenizer numbers the added tokens otherwise than the planned "
            "vocabulary (ids with gaps?); use tokenizer_source: base or a model folder instead of union"
        )
    return tokenizer


def _spec(info) -> AddedSpec:
    return AddedSpec(
        content=str(info.content),
        single_word=bool(info.single_word),
        lstrip=bool(info.lstrip),
        rstrip=bool(info.rstrip),
        normalized=bool(info.normalized),
        special=bool(info.special),
    )


__all__ = [
    "has_tokenizer",
    "input_vocabs",
    "load_tokenizer",
    "output_tokenizer",
    "read_vocab",
    "vocab_of",
    "vocab_plan_for",
]
