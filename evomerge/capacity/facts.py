"""What the plan knows before anything loads: the inputs' sizes (safetensors headers, config.json) and the search
tasks' request lengths (their documents and the base's tokenizer). No weight is read.

    model = ModelFacts.of_inputs(cfg.base_model, cfg.models, dtype=cfg.dtype)
    tasks = TaskFacts.of_scorer(scorer, cfg.base_model)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.scoring.prefix import SHARED_PREFIX_MIN

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
DEFAULT_GEN_TOKS = 256  # lm-eval's HFLM.max_gen_toks, used where a generation task sets none
LLAMA_LAYER_TENSORS = 9  # q, k, v, o, gate, up, down and two norms


def resident_dtype(dtype: str | None, config: dict[str, Any]) -> str:
    """The resident model's dtype, as `Materializer` picks it: the config's `dtype`, else the base's config.json
    (`dtype` / `torch_dtype`), else float32."""
    stored = config.get("dtype") or config.get("torch_dtype")
    return dtype or (stored if stored in ITEMSIZE else None) or "float32"


def gb(n: float) -> str:
    """Bytes for a reader: MB below a tenth of a GB, else GB (decimal units, as nvidia-smi and free -h print)."""
    if n < 1e8:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of one search's models. `params`: elements of the resident model's parameters (a tied head once);
    `layer_params`: of one decoder layer; `input_bytes`: each input's weight files as stored (the base last)."""

    params: int
    layer_params: int
    largest: int  # elements of the largest tensor (one merge's buffers scale with it)
    input_bytes: tuple[int, ...]
    dtype: str  # the resident model's
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the base's config.json
    n_tensors: int = 0  # tensors of the base's weight files (0: LLAMA_LAYER_TENSORS a layer, for a config alone)
    # (rows, columns) of each 2-D weight matrix the subspace merges take an SVD of (the header's; () for a config
    # alone: a Llama's seven a layer, `weight_matrices`)
    matrix_shapes: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)

    @property
    def tensors(self) -> int:
        """Tensors a merge writes: the header's count, else a Llama's (9 a layer, embeddings, norm and head)."""
        return self.n_tensors or self.layers * LLAMA_LAYER_TENSORS + 2 + (not self.config.get("tie_word_embeddings"))

    @property
    def weight_matrices(self) -> tuple[tuple[int, int], ...]:
        """(rows, columns) of every 2-D weight matrix outside the embeddings and head (merge/layout.py's
        EMBEDDING_PARTS), in the order a merge meets them: the header's, else a Llama's q, k, v, o, gate, up and
        down per layer from the config's shape."""
        if self.matrix_shapes:
            return self.matrix_shapes
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        layer = ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))
        return layer * self.layers

    @property
    def stored_itemsize(self) -> int:
        """Bytes of one element as the inputs store it (the base's config.json dtype, float32 when unset)."""
        return ITEMSIZE[resident_dtype(None, self.config)]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def resident_bytes(self) -> int:
        return self.params * self.itemsize

    @property
    def n_inputs(self) -> int:
        return len(self.input_bytes)

    @classmethod
    def of_inputs(
        cls, base: str | os.PathLike, models: Sequence[str | os.PathLike], dtype: str | None = None
    ) -> ModelFacts:
        """From the inputs' safetensors headers and the base's config.json. A LoRA adapter among `models` (a folder
        over `base`, or `BASE+ADAPTER`) counts its own files: its base is mapped once, with the base."""
        from evomerge.io.checkpoint import Checkpoint
        from evomerge.io.inputs import split_ref

        base_folder, _ = split_ref(base)
        ref = Checkpoint(base_folder)
        names = ref.tensor_names()
        numel = {n: _numel(ref.shape(n)) for n in names}
        matrices = tuple(tuple(ref.shape(n)) for n in names if _takes_svd(n, ref.shape(n)))
        return cls.of_config(
            ref.config,
            input_bytes=_input_bytes(base, models),
            dtype=dtype,
            largest=max(numel.values(), default=0),
            stored_params=sum(numel.values()),
            n_tensors=len(numel),
            matrix_shapes=matrices,
        )

    @classmethod
    def of_config(
        cls,
        config: dict[str, Any],
        *,
        input_bytes: Sequence[int] | None = None,
        n_inputs: int = 4,
        dtype: str | None = None,
        largest: int | None = None,
        stored_params: int | None = None,
        n_tensors: int = 0,
        matrix_shapes: tuple[tuple[int, int], ...] = (),
    ) -> ModelFacts:
        """From a config.json alone (the projection's 7B-70B shapes); `input_bytes` default to `n_inputs` copies of
        the model as its config's dtype stores it."""
        from evomerge.io.checkpoint import config_field, config_num_layers

        def get(field: str) -> int:
            return int(config_field(config, field)[1] or 0)

        hidden, heads = get("hidden_size"), get("num_attention_heads")
        layers = config_num_layers(config) or 0
        inter = get("intermediate_size") or 4 * hidden
        shape = dict(
            layers=layers,
            hidden=hidden,
            intermediate=inter,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=int(config.get("head_dim") or (hidden // max(heads, 1))),
            vocab=get("vocab_size"),
        )
        counted = _meta_params(config)
        params, layer_params = counted if counted else _llama_params(shape, config)
        kind = resident_dtype(dtype, config)
        if input_bytes is None:
            stored = ITEMSIZE[resident_dtype(None, config)]
            input_bytes = [(stored_params or params) * stored] * n_inputs
        return cls(
            params=params,
            layer_params=layer_params,
            largest=largest or max(shape["vocab"] * hidden, inter * hidden),
            input_bytes=tuple(int(b) for b in input_bytes),
            dtype=kind,
            config=dict(config),
            n_tensors=n_tensors,
            matrix_shapes=matrix_shapes,
            **shape,
        )


def _input_bytes(base: str | os.PathLike, models: Sequence[str | os.PathLike]) -> list[int]:
    """Each input's weight bytes as stored, the base last; an adapter's are its own files', plus its base's where
    that is a full model not counted yet (the worker maps each full checkpoint once, `io.inputs.open_inputs`)."""
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.io.inputs import ref_key, split_ref
    from evomerge.io.lora import adapter_nbytes, is_adapter

    base_folder, base_adapter = split_ref(base)
    counted = {ref_key(base_folder)}
    out = []
    for ref in models:
        model, adapter = split_ref(ref)
        if adapter is None and is_adapter(model):
            model, adapter = base_folder, model  # an adapter folder named alone merges over the base
        if adapter is None:
            out.append(Checkpoint(model).nbytes())
            continue
        own = 0 if ref_key(model) in counted else Checkpoint(model).nbytes()
        counted.add(ref_key(model))
        out.append(adapter_nbytes(adapter) + own)
    return [*out, Checkpoint(base_folder).nbytes() + (adapter_nbytes(base_adapter) if base_adapter else 0)]


def _takes_svd(name: str, shape: Sequence[int]) -> bool:
    """merge/kernels/subspace.py's `takes_subspace_rule` from a header: a 2-D matrix, not an embedding or head."""
    from evomerge.merge.layout import EMBEDDING_PARTS

    return len(shape) == 2 and min(shape) > 1 and not any(part in name for part in EMBEDDING_PARTS)


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _meta_params(config: dict[str, Any]) -> tuple[int, int] | None:
    """(parameters, parameters of decoder layer 0) of the model transformers builds for `config`, on the meta
    device; None when transformers cannot build it (an unknown or remote-code architecture)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        data = {k: v for k, v in config.items() if k != "transformers_version"}
        hf = AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
    except Exception:  # noqa: BLE001 - the plan falls back to the Llama count
        return None
    from evomerge.merge.layout import layer_index

    seen: set[int] = set()
    total = layer0 = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        layer0 += p.numel() if layer_index(name) == 0 else 0
    return total, layer0


def _llama_params(shape: dict[str, int], config: dict[str, Any]) -> tuple[int, int]:
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv_heads"] * shape["head_dim"]
    q = shape["heads"] * shape["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    embed = shape["vocab"] * h
    head = 0 if config.get("tie_word_embeddings") else embed
    return shape["layers"] * layer + embed + head + h, layer


@dataclass(frozen=True)
class TaskFacts:
    """The search tasks' requests as lm-eval runs them: how many (one call scores every search task's subset),
    the longest in tokens (context + answer, or context + `max_gen_toks` for generation), and the refinement's
    batch (one row per answer continuation of every search example)."""

    requests: int
    longest: int
    generates: bool
    refine_rows: int
    refine_tokens: int  # tokens of all those rows together (padded to the longest)
    # what the time plan reads (capacity/timing.py): the tokens one evaluation runs through the model
    scored_tokens: int = 0  # loglikelihood and multiple-choice requests: context + continuation, each request
    prompt_tokens: int = 0  # generation requests' contexts (one forward each)
    generated_tokens: int = 0  # tokens generated, expected: each reference answer and its stop, at most max_gen_toks
    generation_tasks: tuple[tuple[int, int], ...] = ()  # per generation task: (examples, steps of its longest answer)
    scored_lengths: tuple[int, ...] = ()  # each loglikelihood request's tokens (lm-eval pads them in batches)
    # each such request's (task number, tokens every request of its task begins with): a batch of one task runs its
    # shared prefix once (scoring/lm.py), e.g. a chat template's system turn
    scored_shared: tuple[tuple[int, int], ...] = ()
    largest_subset: int = 0  # examples of the largest search subset (the refinement's examples rule reads it)
    refine_positions: int = 0  # the refinement batch's tokens unpadded (context + each continuation, every example)
    refine_shared: int = 0  # of `refine_tokens`, those a task's shared prefix (a chat turn) skips: run once instead

    @classmethod
    def of_scorer(cls, scorer, tokenizer_source: str | os.PathLike | None) -> TaskFacts:
        """The requests of `scorer`'s tasks, in tokens of `tokenizer_source`'s tokenizer (None: about
        CHARS_PER_TOKEN characters a token, for a plan from a config.json alone)."""
        tok = _tokenizer(tokenizer_source) if tokenizer_source is not None else _estimate_tokens
        requests = rows = longest = width = largest = positions = 0
        tokens = {"scored_tokens": 0, "prompt_tokens": 0, "generated_tokens": 0}
        generation_tasks, scored_lengths, scored_shared = [], [], []
        shared = 0
        for number, (leaf, task) in enumerate(scorer.tasks.items()):
            contexts: list[list[int]] = []  # a scored request's context, once per lm-eval run
            every: list[list[int]] = []  # each example's context (the refinement's rows begin with it)
            task_rows = 0
            kind = task.OUTPUT_TYPE
            gen = _max_gen_toks(task) if kind == "generate_until" else 0
            docs, answer = task.eval_docs, 0
            largest = max(largest, len(scorer.indices(leaf)))
            chat = scorer.chat.get(leaf) and getattr(tok, "chat_template", None)
            for i in scorer.indices(leaf):
                ctx, conts = _request_text(task, docs[i], kind)
                if chat:  # the prompt as the model's chat template renders it (its system turn included)
                    ctx = tok.apply_chat_template(
                        [{"role": "user", "content": ctx}], tokenize=False, add_generation_prompt=True
                    )
                ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]  # lm-eval's HFLM adds no BOS
                n_ctx = len(ctx_ids)
                cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
                every.append(ctx_ids)
                task_rows += len(conts)
                lengths = [n_ctx + len(ids) for ids in cont_ids]
                requests += 1 if kind == "generate_until" else len(conts)
                longest = max(longest, n_ctx + gen, *lengths)
                rows += len(conts)
                positions += sum(lengths)
                width = max(width, *lengths)
                if kind == "generate_until":  # the reference answer and the stop that ends it
                    steps = min(gen, lengths[0] - n_ctx + 1)
                    tokens["prompt_tokens"] += n_ctx
                    tokens["generated_tokens"] += steps
                    answer = max(answer, steps)
                else:  # lm-eval runs the choices that share all but their last token once (its logits cache)
                    runs = {tuple(ids[:-1]): n_ctx + len(ids) for ids in cont_ids}
                    tokens["scored_tokens"] += sum(runs.values())
                    scored_lengths += runs.values()
                    contexts += [ctx_ids] * len(runs)
            if contexts:
                prefix = _common_prefix(contexts)
                scored_shared += [(number, prefix)] * len(contexts)
            if every and (prefix := _common_prefix(every)) >= SHARED_PREFIX_MIN:
                shared += task_rows * prefix
            if kind == "generate_until":
                generation_tasks.append((len(scorer.indices(leaf)), answer))
        return cls(
            requests=requests,
            longest=longest,
            generates=bool(generation_tasks),
            refine_rows=rows,
            refine_tokens=rows * width,
            generation_tasks=tuple(generation_tasks),
            scored_lengths=tuple(scored_lengths),
            scored_shared=tuple(scored_shared),
            refine_shared=shared,
            largest_subset=largest,
            refine_positions=positions,
            **tokens,
        )


def _common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row has in common."""
    first, n = rows[0], min(map(len, rows))
    return next((i for i in range(n) if any(r[i] != first[i] for r in rows)), n)


CHARS_PER_TOKEN = 4  # English text in a BPE vocabulary of 32-150k tokens, roughly


def _estimate_tokens(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
    return {"input_ids": [0] * -(-len(text) // CHARS_PER_TOKEN)}


def _tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer

    from evomerge.errors import ModelError, first_line

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:  # what the workers' own load would raise
        raise ModelError(
            f"{source}: its tokenizer cannot be loaded ({first_line(exc)}); a base model folder needs "
            "its tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None


def _max_gen_toks(task) -> int:
    kwargs = task.get_config("generation_kwargs") or {}
    return int(kwargs.get("max_gen_toks") or DEFAULT_GEN_TOKS)


def _request_text(task, doc, kind: str) -> tuple[str, list[str]]:
    """(context, continuations) of one example, as lm-eval builds its requests."""
    ctx = task.fewshot_context(doc, num_fewshot=task.get_config("num_fewshot") or 0)
    ctx = ctx if isinstance(ctx, str) else str(ctx[0])
    delim = task.get_config("target_delimiter") or ""
    if kind == "multiple_choice":
        return ctx, [f"{delim}{c}" for c in task.doc_to_choice(doc)]
    target = task.doc_to_target(doc)
    target = target[0] if isinstance(target, list) else target
    return ctx, [f"{delim}{target}"]


__all__ = ["ITEMSIZE", "ModelFacts", "TaskFacts", "gb", "resident_dtype"]
