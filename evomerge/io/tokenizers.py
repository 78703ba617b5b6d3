"""Read a model folder's tokenizer, and build the output tokenizer of a merge; plain data in and out.

    tok = load_tokenizer("zoo/add")                   # transformers' fast tokenizer, local files only
    tokens, added = tokenizer_entries(tok)            # token -> id; [{content, special, normalized, ...}] by id
    out = extended_tokenizer("zoo/base", ["<sep>", {"content": "<|im_start|>", "special": True, ...}])

Tokenizers are read with transformers' AutoTokenizer (fast, never remote code), as mergekit reads them, so the
ids and added-token settings are the ones the models were trained with. What the output vocabulary is, and where
each model's rows go in it, is `evomerge.merge.vocab`'s (pure, no files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ADDED_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")  # tokenizers.AddedToken's settings


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


def tokenizer_entries(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(token -> id, the added tokens in id order as {content, single_word, lstrip, rstrip, normalized, special})."""
    added = [
        {"content": str(info.content), **{f: bool(getattr(info, f)) for f in ADDED_FIELDS}}
        for _, info in sorted(tokenizer.added_tokens_decoder.items(), key=lambda kv: kv[0])
    ]
    return dict(tokenizer.get_vocab()), added


def extended_tokenizer(
    folder: str | os.PathLike,
    additions: Sequence[str | Mapping[str, Any]] = (),
    expected: Mapping[str, int] | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer in `folder` with `additions` added in order, as mergekit adds them (transformers' `add_tokens`:
    a plain token by its text, an added token with its settings); ModelError if the result's vocabulary is not
    `expected` (a tokenizer whose ids have gaps numbers added tokens otherwise)."""
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(folder)
    for item in additions:
        if isinstance(item, str):
            tokenizer.add_tokens(item)
        else:
            tokenizer.add_tokens(AddedToken(item["content"], **{f: item[f] for f in ADDED_FIELDS}))
    if expected is not None and dict(tokenizer.get_vocab()) != dict(expected):
        raise ModelError(
            f"{folder}: its tokenizer numbers the added tokens otherwise than the planned vocabulary (ids with "
            "gaps?); use tokenizer_source: base or a model folder instead of union"
        )
    return tokenizer


def template_names() -> list[str]:
    """The chat template names mergekit ships (its `_data/chat_templates/NAME.jinja`): chatml, llama3, ..."""
    from importlib import resources

    from mergekit._data import chat_templates

    return sorted(
        p.name.removesuffix(".jinja") for p in resources.files(chat_templates).iterdir() if p.name.endswith(".jinja")
    )


def chat_template_text(value: str) -> str | None:
    """A recipe's `chat_template` as the template it writes, by mergekit's rules: a name mergekit ships (`chatml`)
    is that file's text; `auto` is None (the inputs' most common template, `auto_chat_template`); anything else is a
    literal Jinja template, which must contain `{` and be at least 20 characters. ConfigError otherwise."""
    from importlib import resources

    from mergekit._data import chat_templates

    from evomerge.errors import ConfigError

    if value == "auto":
        return None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        file = resources.files(chat_templates).joinpath(value + ".jinja")
        if file.is_file():
            return file.read_text()
    if len(value) < 20 or "{" not in value:
        raise ConfigError(
            f"field chat_template: {value!r} is neither a template name ({', '.join(template_names())}, auto) nor a "
            "Jinja template (one has '{' and 20 characters or more)"
        )
    return value


def auto_chat_template(folders: Sequence[str | os.PathLike]) -> str | None:
    """`chat_template: auto`: the template most of the input folders' tokenizers have (the first in recipe order
    among equals), else None."""
    from collections import Counter

    templates = []
    for folder in folders:
        if not has_tokenizer(folder):
            continue
        template = load_tokenizer(folder).chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return Counter(templates).most_common(1)[0][0] if templates else None


__all__ = [
    "ADDED_FIELDS",
    "auto_chat_template",
    "chat_template_text",
    "extended_tokenizer",
    "has_tokenizer",
    "load_tokenizer",
    "template_names",
    "tokenizer_entries",
]
