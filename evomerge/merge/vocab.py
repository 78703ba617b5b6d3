"""Vocabularies that differ: mergekit 0.1.5's `tokenizer_source` (union, base, or a model), as pure functions.

    plan = plan_vocab("union", "base", {"base": v0, "add": v1, "reverse": v2})
    plan.tokens                       # the output vocabulary (token -> id)
    rows = align_rows([e0, e1, e2], [plan.maps[k] for k in ("base", "add", "reverse")], base=0)

The arithmetic is pure (no files); `vocab_plan_for` and `output_tokenizer`, at the end, read the inputs'
tokenizers through `evomerge.io.tokenizers`.

The output vocabulary (mergekit's `build_tokenizer`): `base` is the base model's (the first input without a
base_model); a model folder is that folder's; `union` is the base's, then every token another input has and the
base lacks: first the ones of their main vocabularies, then their added tokens (the first input that adds a
token gives its settings), inputs visited in recipe order, each in id order. Tokens at ids past a model's
embedding rows are left out (mergekit warns and skips them).

Each input's embedding and head rows are then laid out in the output vocabulary (mergekit's `PermutedVocabulary`):
a token the input has takes its own row; for a token it lacks, the row is the one input's that has it when only
one does, the base's when the base is merged with it and has it, the mean of the inputs' that have it otherwise,
and zero when none does. The merge method then merges the aligned tensors as it merges any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from evomerge.errors import ModelError

if TYPE_CHECKING:
    import torch

SOURCES = ("union", "base")  # or a model folder


@dataclass(frozen=True)
class AddedSpec:
    """One added token and its settings (`tokenizers.AddedToken`)."""

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    special: bool = False


@dataclass(frozen=True)
class Vocab:
    """One model's tokenizer: token -> id, its added tokens (content -> settings, in id order) and `rows`, the rows
    of its embedding and head (config.json vocab_size)."""

    tokens: Mapping[str, int]
    added: Mapping[str, AddedSpec] = field(default_factory=dict)
    rows: int = 0

    def usable(self) -> dict[str, int]:
        """The tokens with a row: ids below `rows`."""
        return {t: i for t, i in self.tokens.items() if i < self.rows}


@dataclass(frozen=True)
class TokenRow:
    """A `tokenizer: tokens:` entry resolved: output row `row` takes `model`'s row `source_row` (None `model`: zeros)
    where a model lacks the token, or in every model with `force`."""

    row: int
    force: bool
    model: str | None
    source_row: int | None


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary of a merge and where each input's rows go in it.

    `additions` (union only): what is added to the base's tokenizer, in order (a plain token as its text, an added
    token with its settings); `folder`: the tokenizer folder named as tokenizer_source (None: the base's);
    `maps[model][i]`: the row of output token i in that model's tensors, -1 where it lacks the token; `tensors`:
    the names of the tensors laid out this way."""

    source: str
    tokens: Mapping[str, int]
    maps: Mapping[str, tuple[int, ...]]
    additions: tuple[str | AddedSpec, ...] = ()
    folder: str | None = None
    tensors: frozenset[str] = frozenset()  # the merge's vocabulary tensors (embeddings, head), by name
    overrides: tuple[TokenRow, ...] = ()  # the `tokenizer:` block's `tokens`, resolved
    pad_to_multiple_of: int | None = None  # the `tokenizer:` block's: rows padded up to a multiple of it

    @property
    def rows(self) -> int:
        """The output's embedding and head rows: one per token, padded up to `pad_to_multiple_of`."""
        n, m = len(self.tokens), self.pad_to_multiple_of
        return n if not m or n % m == 0 else (n // m + 1) * m

    def added_to(self, model: str) -> list[str]:
        """Output tokens that `model` lacks, in output id order."""
        order = sorted(self.tokens, key=self.tokens.__getitem__)
        return [t for t in order if self.maps[model][self.tokens[t]] < 0]


def plan_vocab(
    source: str,
    base: str,
    vocabs: Mapping[str, Vocab],
    source_vocab: Vocab | None = None,
    source_folder: str | None = None,
) -> VocabPlan:
    """The plan of `tokenizer_source: source` over the inputs `vocabs` (model -> Vocab, recipe order; `base`: the
    base model, or the first input when the recipe has none). `source_vocab`: the named folder's tokenizer, when
    `source` is a folder. ModelError for a token at an id past its model's rows (mergekit fails on it)."""
    base_vocab = vocabs[base]
    past = [t for t, i in base_vocab.tokens.items() if i >= base_vocab.rows]
    if past and source in SOURCES:
        raise ModelError(
            f"{base}: its tokenizer has {len(past)} token(s) past its {base_vocab.rows} embedding rows (first: "
            f"{past[0]!r}); resize the model's embeddings to its tokenizer, or name a tokenizer folder as "
            "tokenizer_source"
        )
    additions: tuple[str | AddedSpec, ...] = ()
    if source == "union":
        additions = union_additions(base, vocabs)
        tokens = dict(base_vocab.tokens)
        for item in additions:
            tokens[item if isinstance(item, str) else item.content] = len(tokens)
    elif source == "base":
        tokens = dict(base_vocab.tokens)
    else:
        if source_vocab is None:
            raise ValueError("a tokenizer folder as source needs its vocabulary")
        tokens = dict(source_vocab.tokens)
    maps = {model: _row_map(model, tokens, vocab) for model, vocab in vocabs.items()}
    return VocabPlan(source, tokens, maps, additions, source_folder if source not in SOURCES else None)


def union_additions(base: str, vocabs: Mapping[str, Vocab]) -> tuple[str | AddedSpec, ...]:
    """What `union` adds to the base's tokenizer (mergekit's `build_union_tokenizer`): the other inputs' main
    vocabulary tokens the base lacks, then every input's added tokens the base lacks (first settings win)."""
    order = [base] + [m for m in vocabs if m != base]
    plain: dict[str, None] = {}
    added: dict[str, AddedSpec] = {}
    for model in order:
        vocab = vocabs[model]
        for token, index in sorted(vocab.tokens.items(), key=lambda kv: kv[1]):
            if index < vocab.rows and token not in vocab.added:
                plain.setdefault(token, None)
        for token, spec in vocab.added.items():
            if vocab.tokens.get(token, vocab.rows) < vocab.rows:
                added.setdefault(token, spec)
    known = vocabs[base].tokens
    out: list[str | AddedSpec] = [t for t in plain if t not in added and t not in known]
    out += [spec for t, spec in added.items() if t not in known]
    return tuple(out)


def _row_map(model: str, tokens: Mapping[str, int], vocab: Vocab) -> tuple[int, ...]:
    rows = [-1] * len(tokens)
    for token, out_index in tokens.items():
        index = vocab.tokens.get(token)
        if index is None:
            continue
        if index >= vocab.rows:
            raise ModelError(
                f"{model}: token {token!r} has id {index}, past its {vocab.rows} embedding rows; resize the model's "
                "embeddings to its tokenizer"
            )
        rows[out_index] = index
    return tuple(rows)


def align_rows(
    tensors: Sequence[torch.Tensor],
    maps: Sequence[Sequence[int]],
    base: int | None = None,
    overrides: Mapping[int, tuple[bool, torch.Tensor]] | None = None,
    rows: int | None = None,
) -> list[torch.Tensor]:
    """Each input's vocabulary tensor (rows along dim 0) laid out in the output vocabulary: `maps[i][j]` is the row
    of output token j in `tensors[i]` (-1: lacking); `base`: the base model's position among the inputs, or None.
    `overrides` ({output row: (force, row)}, the `tokenizer:` block's tokens): the row an input lacking that token
    takes (every input, with force). `rows` (past the tokens: `pad_to_multiple_of`): each input's extra rows are the
    mean of its token rows. The results share dtype (the inputs' promoted one) and device (the first input's)."""
    import torch

    if not tensors:
        return []
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    index = torch.tensor([list(m) for m in maps], dtype=torch.long, device=device)  # (inputs, out rows)
    present = index >= 0
    count = present.sum(0)
    shape = (index.shape[1], *tensors[0].shape[1:])
    default = torch.zeros(shape, dtype=dtype, device=device)
    lacking = count < len(tensors)
    donor = lacking & (count == 1)
    from_base = lacking & (count > 1) & (present[base] if base is not None else torch.zeros_like(lacking))
    mean = lacking & (count > 1) & ~from_base
    for i, t in enumerate(tensors):
        take = donor & present[i] if base is None or i != base else (donor | from_base) & present[i]
        if take.any():
            default[take] = t[index[i, take]].to(dtype)
        add = mean & present[i]
        if add.any():  # mergekit sums the rows input by input, then divides by their count
            default[add] = default[add] + t[index[i, add]].to(dtype)
    for c in count[mean].unique().tolist():
        chosen = mean & (count == c)
        default[chosen] = default[chosen] / c
    forced = torch.zeros_like(lacking)
    for row, (force, value) in (overrides or {}).items():
        if force or bool(lacking[row]):  # mergekit's per-token default, used where a model lacks it (or forced)
            default[row] = value.to(dtype=dtype, device=device)
        forced[row] = force
    out = []
    for i, t in enumerate(tensors):
        aligned = default.clone()
        own = present[i] & ~forced
        aligned[own] = t[index[i, own]].to(dtype)
        if rows is not None and rows > aligned.shape[0]:
            pad = aligned.mean(dim=0, keepdim=True).expand(rows - aligned.shape[0], *aligned.shape[1:])
            aligned = torch.cat([aligned, pad])
        out.append(aligned)
    return out


def is_vocab_tensor(name: str, shape: Sequence[int], rows: int) -> bool:
    """Whether a tensor has one row per token (an embedding or an output head): outside the decoder layers, named
    as one, its first dimension the model's vocabulary rows (position embeddings are not)."""
    from evomerge.merge.layout import EMBEDDING_PARTS, layer_index

    if layer_index(name) is not None or not shape or shape[0] != rows:
        return False
    return any(part in name for part in EMBEDDING_PARTS if part != "wpe")


def describe_difference(base: str, vocabs: Mapping[str, Vocab], limit: int = 5) -> list[str]:
    """One line per model whose vocabulary differs from the base's: the tokens it adds, the ones it lacks."""
    ref = vocabs[base]
    lines = []
    for model, vocab in vocabs.items():
        if model == base:
            continue
        extra = sorted((t for t in vocab.tokens if t not in ref.tokens), key=vocab.tokens.__getitem__)
        lacking = sorted((t for t in ref.tokens if t not in vocab.tokens), key=ref.tokens.__getitem__)
        # in the base's id order: a tokenizer's get_vocab() is a hash map's order, not a stable one
        moved = sorted(
            (t for t, i in vocab.tokens.items() if t in ref.tokens and ref.tokens[t] != i), key=ref.tokens.__getitem__
        )
        if not extra and not lacking and not moved and vocab.rows == ref.rows:
            continue
        parts = []
        if extra:
            parts.append(f"adds {len(extra)} token(s) {_some(extra, limit)}")
        if lacking:
            parts.append(f"lacks {len(lacking)} of the base's {_some(lacking, limit)}")
        if moved:
            parts.append(f"numbers {len(moved)} token(s) otherwise {_some(moved, limit)}")
        if vocab.rows != ref.rows:
            parts.append(f"has {vocab.rows} embedding rows (base: {ref.rows})")
        lines.append(f"{model}: " + "; ".join(parts))
    return lines


def _some(tokens: Sequence[str], limit: int) -> str:
    shown = ", ".join(repr(t) for t in tokens[:limit])
    return f"({shown}{', ...' if len(tokens) > limit else ''})"


# ---- from opened inputs (their tokenizers read through evomerge.io.tokenizers) --------------------------------
def vocab_of(tokenizer, rows: int) -> Vocab:
    """A loaded tokenizer's Vocab: its tokens, its added tokens in id order, and the model's `rows`."""
    from evomerge.io.tokenizers import tokenizer_entries

    tokens, added = tokenizer_entries(tokenizer)
    return Vocab(tokens=tokens, added={a["content"]: AddedSpec(**a) for a in added}, rows=rows)


def input_vocabs(inputs: Mapping[str, Any]) -> dict[str, Vocab]:
    """{model: its Vocab} of opened inputs (Checkpoint or LoraCheckpoint, recipe order), each tokenizer folder read
    once; a model folder without tokenizer files has the first input's tokenizer (mergekit assumes the base's)."""
    from evomerge.io.checkpoint import vocab_rows
    from evomerge.io.tokenizers import has_tokenizer, load_tokenizer

    loaded: dict[Any, Any] = {}
    fallback = None
    out = {}
    for model, ckpt in inputs.items():
        folder = ckpt.model_dir
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
    source: str,
    inputs: Mapping[str, Any],
    base: str | None,
    *,
    field: str = "tokenizer_source",
    block: Any = None,
) -> VocabPlan:
    """The plan of `tokenizer_source: source` over opened `inputs` ({model: checkpoint}, recipe order; `base`: the
    base model, or None for the first input), with the reference's vocabulary tensors named. `block`: the recipe's
    `tokenizer:` block (its `tokens` and `pad_to_multiple_of`)."""
    from evomerge.io.checkpoint import vocab_rows
    from evomerge.io.tokenizers import has_tokenizer, load_tokenizer

    base = base if base is not None else next(iter(inputs))
    folder, source_vocab = None, None
    if source not in SOURCES:
        if not has_tokenizer(source):
            raise ModelError(
                f"field {field}: {source} is not a folder with a tokenizer (tokenizer.json); use union, base or "
                "a model folder"
            )
        folder = str(source)
        tokenizer = load_tokenizer(folder)
        source_vocab = vocab_of(tokenizer, len(tokenizer.get_vocab()))
    vocabs = input_vocabs(inputs)
    plan = plan_vocab(source, base, vocabs, source_vocab, folder)
    if block is not None:
        plan = replace(plan, overrides=token_rows(plan, vocabs, block), pad_to_multiple_of=block.pad_to_multiple_of)
    ref = inputs[base]
    rows = vocab_rows(ref)
    tensors = frozenset(n for n in ref.tensor_names() if is_vocab_tensor(n, ref.shape(n), rows or -1))
    if not tensors:
        raise ModelError(
            f"{ref.model_dir}: no embedding or head tensor with {rows} rows (config.json vocab_size) was found; "
            f"{field} needs the vocabulary tensors (embed_tokens, lm_head, ...)"
        )
    return replace(plan, tensors=tensors)


def token_rows(plan: VocabPlan, vocabs: Mapping[str, Vocab], block: Any) -> tuple[TokenRow, ...]:
    """The `tokenizer:` block's `tokens` over the planned vocabulary (tokens it lacks are skipped, as mergekit skips
    them); ModelError naming the token where a source is not among the inputs or lacks the token it names."""
    out = []
    for token, setting in (block.tokens or {}).items():
        row = plan.tokens.get(token)
        if row is None:
            continue
        where = f"field tokenizer.tokens.{token}.source"
        ref = setting.source
        if ref is None:
            raise ModelError(f"{where}: missing; name a model folder, {{kind: model_token, ...}} or {{kind: zero}}")
        if not isinstance(ref, str) and ref.kind == "zero":
            out.append(TokenRow(row, setting.force, None, None))
            continue
        model = ref if isinstance(ref, str) else ref.model
        if model not in vocabs:
            raise ModelError(f"{where}: {model} is not one of the recipe's models; name one of them")
        vocab = vocabs[model]
        if isinstance(ref, str):
            source_row = plan.maps[model][row]
        elif ref.token_id is not None:
            source_row = ref.token_id if 0 <= ref.token_id < vocab.rows else -1
        else:
            source_row = vocab.usable().get(ref.token, -1)
        if source_row < 0:
            raise ModelError(f"{where}: {model} has no row for it; name a token that model has")
        out.append(TokenRow(row, setting.force, model, source_row))
    return tuple(out)


def output_tokenizer(plan: VocabPlan, base_folder):
    """The merge's tokenizer: the base's with `plan.additions` added (`union`), the base's (`base`), or the named
    folder's; ModelError where transformers numbers the result otherwise than the plan."""
    from dataclasses import asdict

    from evomerge.io.tokenizers import extended_tokenizer

    additions = [a if isinstance(a, str) else asdict(a) for a in plan.additions]
    return extended_tokenizer(plan.folder or base_folder, additions, plan.tokens)


__all__ = [
    "SOURCES",
    "AddedSpec",
    "TokenRow",
    "Vocab",
    "VocabPlan",
    "align_rows",
    "describe_difference",
    "input_vocabs",
    "is_vocab_tensor",
    "output_tokenizer",
    "plan_vocab",
    "token_rows",
    "union_additions",
    "vocab_of",
    "vocab_plan_for",
]
