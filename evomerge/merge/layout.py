"""What an architecture's tensor names mean: which decoder layer, which kind (attention, MLP), embeddings and head.

    layout = Layout.of(Checkpoint("zoo/base"))     # config.json and the safetensors headers; no weights read
    layout.kind_filter("self_attn")                # 'self_attn' (Llama, Qwen2, Phi-3), 'attn' (GPT-2), ...
    layout.embedding_filters()                     # ['embed_tokens', 'lm_head'], ['wte', 'wpe'], ...

evomerge reads a checkpoint's own tensor names instead of a table per architecture, so an architecture it has
never seen works as long as its decoder layers are numbered (`model.layers.3.`, `transformer.h.3.`,
`gpt_neox.layers.3.`). A search space's kinds (`self_attn`, `mlp`) are names for what a tensor does; each maps to
the first of its aliases that the architecture's layer tensors contain, and the recipe gets that alias as its
mergekit `filter:` (a substring of the tensor name, as mergekit matches filters).

Tied embeddings: where the model ties its output head to its input embeddings and a checkpoint still stores both,
the head is a duplicate (`tied`): it is merged once, as the embeddings, and not written again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from evomerge.io.checkpoint import Checkpoint

# `model.layers.3.`, `transformer.h.3.`, `gpt_neox.layers.3.`, `blocks.3.`, `encoder.layer.3.`: the decoder-layer index
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# A search space's kind -> the substrings that name it, most specific first
KIND_ALIASES: dict[str, tuple[str, ...]] = {
    "self_attn": ("self_attn", "attn", "attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}
# Outside the layers: token and position embeddings, and the output head (GPT-NeoX calls it embed_out)
EMBEDDING_PARTS = ("embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "lm_head", "embed_out")
HEAD_PARTS = ("lm_head", "embed_out")
# Outside the layers, after them: final norms and the head (mergekit's `post_weights`); the rest comes before
AFTER_LAYERS_PARTS = ("norm", "ln_f", "lm_head", "embed_out", "score")


def layer_index(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, index: int) -> str:
    """`name` with its decoder-layer index replaced by `index`."""
    match = LAYER_RE.search(name)
    if match is None:
        raise ValueError(f"{name} is not inside a numbered layer")
    return name[: match.start(1)] + str(index) + name[match.end(1) :]


def _is_norm(name: str) -> bool:
    """A layer norm inside a decoder layer (`input_layernorm`, `post_attention_layernorm`, GPT-2's `ln_1`)."""
    match = LAYER_RE.search(name)
    rest = name[match.end() :] if match else name
    return "norm" in rest or rest.startswith("ln_")


def after_layers(name: str) -> bool:
    """Whether a tensor outside the layers comes after them (final norm, head) rather than before (embeddings)."""
    return layer_index(name) is None and any(part in name for part in AFTER_LAYERS_PARTS)


@dataclass(frozen=True)
class Layout:
    """The tensor names of one checkpoint (the base model) and what they mean.

    `tied`: names the model ties to another stored tensor (a head stored next to the embeddings it is tied to);
    filled by `Layout.of(..., tied=True)` or by the resident model (`tied_names`)."""

    architecture: str
    names: tuple[str, ...]
    num_layers: int
    tied: frozenset[str] = frozenset()

    @classmethod
    def of(cls, checkpoint: Checkpoint, *, tied: bool = False) -> Layout:
        names = tuple(checkpoint.tensor_names())
        counted = 1 + max((i for i in map(layer_index, names) if i is not None), default=-1)
        num_layers = checkpoint.num_layers if checkpoint.num_layers is not None else counted
        dups = tied_in_config(checkpoint.model_dir, names) if tied else frozenset()
        return cls(checkpoint.architecture, names, num_layers, dups)

    @classmethod
    def from_config(cls, folder) -> Layout | None:
        """The layout of the model a folder's config.json describes (its parameter names, as transformers names them),
        for when its weights cannot be read here; None when transformers does not know the architecture."""
        from evomerge.io.checkpoint import config_num_layers

        model = _meta_model(folder)
        if model is None:
            return None
        names = tuple(model.state_dict())
        config = model.config.to_dict()
        layers = config_num_layers(config) or 1 + max((i for i in map(layer_index, names) if i is not None), default=-1)
        architecture = (config.get("architectures") or [type(model).__name__])[0]
        return cls(architecture, names, layers, tied_names(model, names))

    def merged_names(self) -> list[str]:
        """Every stored tensor a merge writes: all but the tied duplicates."""
        return [n for n in self.names if n not in self.tied]

    def layer_names(self, index: int | None = None) -> list[str]:
        """Names inside the decoder layers (or inside layer `index`)."""
        return [n for n in self.names if (i := layer_index(n)) is not None and (index is None or i == index)]

    def kind_filter(self, kind: str) -> str | None:
        """The filter substring for `kind` on this architecture: `kind` itself if a layer tensor contains it, else the
        first alias that one does, bare or between dots; one that also matches a layer norm only when nothing else
        matches (GPT-NeoX: `attention` would also match `post_attention_layernorm`, `.attention.` does not).
        None if nothing in the layers matches."""
        names = self.layer_names()
        norms = [n for n in names if _is_norm(n)]
        candidates = [form for c in (kind, *KIND_ALIASES.get(kind, ())) for form in (c, f".{c}.")]
        for strict in (True, False):
            for form in candidates:
                if any(form in n for n in names) and not (strict and any(form in n for n in norms)):
                    return form
        return None

    def projections(self) -> list[str]:
        """Each weight matrix of a decoder layer by its name inside the layer, norms left out: `self_attn.q_proj`,
        ..., `mlp.down_proj` (Llama); `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` (GPT-2). Each is a filter
        that matches that matrix (and its bias) in every layer and nothing else."""
        out: list[str] = []
        for name in self.layer_names(0):
            if _is_norm(name):
                continue
            role = name[LAYER_RE.search(name).end() :]  # type: ignore[union-attr]
            role = re.sub(r"\.(weight|bias)$", "", role)
            if role not in out:
                out.append(role)
        return out

    def embedding_filters(self) -> list[str]:
        """Filter substrings of the embeddings and head this checkpoint stores (tied duplicates left out)."""
        outside = [n for n in self.merged_names() if layer_index(n) is None]
        return [part for part in EMBEDDING_PARTS if any(part in n for n in outside)]

    def layer_filter(self, index: int) -> str:
        """The filter substring of layer `index` alone: 'model.layers.3.', 'transformer.h.3.' (not 'h.30.')."""
        name = self.layer_names()[0]
        match = LAYER_RE.search(name)
        return f"{name[: match.start(1)]}{index}."  # type: ignore[union-attr]

    def example(self, layer: int, filter: str | None = None) -> str:
        """A tensor of layer `layer` whose name contains `filter` (a representative one for reading a recipe's
        parameters there): the first such name, preferring MLP tensors when no filter is given."""
        names = self.layer_names(layer) or self.layer_names(0)
        if filter is not None:
            names = [n for n in names if filter in n] or names
        else:
            mlp = self.kind_filter("mlp")
            names = [n for n in names if mlp and mlp in n] or names
        if not names:
            raise ValueError(f"{self.architecture} has no tensor inside its decoder layers")
        return sorted(names)[0]

    def describe(self, limit: int = 6) -> str:
        """A few of layer 0's tensor names without their prefix, for error messages: 'attn.c_attn.weight, ...'."""
        parts = sorted({n[LAYER_RE.search(n).end() :] for n in self.layer_names(0)})  # type: ignore[union-attr]
        more = ", ..." if len(parts) > limit else ""
        return ", ".join(parts[:limit]) + more


def tied_names(model: PreTrainedModel, names: Iterable[str], to_model: dict[str, str] | None = None) -> frozenset[str]:
    """Stored `names` that `model` ties to an earlier stored name (same parameter object): merged once, as that one.

    `to_model` maps a stored name to the model's name where they differ (see `model_names`)."""
    to_model = to_model or {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    first: dict[int, str] = {}  # a shared tensor's first name in module order (the embeddings before the head)
    for name, tensor in tensors:
        first.setdefault(id(tensor), name)
    by_name = dict(tensors)
    stored = {to_model.get(n, n): n for n in names}
    dups = set()
    for model_name, name in stored.items():
        tensor = by_name.get(model_name)
        if tensor is not None and first[id(tensor)] != model_name and first[id(tensor)] in stored:
            dups.add(name)
    return frozenset(dups)


def tied_in_config(folder, names: Sequence[str]) -> frozenset[str]:
    """`tied_names` of the model a folder's config.json describes, built on the meta device (no memory, no weights);
    empty when transformers does not know the architecture (it is then merged as stored)."""
    model = _meta_model(folder)
    return frozenset() if model is None else tied_names(model, names, model_names(model, names))


def _meta_model(folder) -> PreTrainedModel | None:
    """The causal LM a folder's config.json describes, on the meta device; None if transformers cannot build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - unknown or remote-code architectures, or no model config at all
        return None


def model_names(model: PreTrainedModel, names: Iterable[str]) -> dict[str, str]:
    """{stored name: the model's name} where transformers renames a checkpoint's tensors on load (GPT-NeoX's
    `embed_out` is `lm_head` in transformers 5); names it keeps are left out."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without load-time renaming: stored names are the model's
        return {}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    state = model.state_dict()
    out = {}
    for name in names:
        if name in state:
            continue
        renamed, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if renamed != name:
            out[name] = renamed
    return out


__all__ = [
    "KIND_ALIASES",
    "LAYER_RE",
    "Layout",
    "after_layers",
    "layer_index",
    "model_names",
    "tied_names",
    "with_layer",
]
