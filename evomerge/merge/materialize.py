"""Merge a recipe tensor by tensor: into a resident model (search) or a stream (export).

    mat = Materializer(["zoo/add", "zoo/reverse"], "zoo/base")   # loads inputs once, builds one model
    mat.apply(recipe)                                            # in place; mat.model is the candidate

The kernels are the set the recipe records (`evomerge.kernels`; see `evomerge.merge.kernels`). Under
evomerge-1 randomness is per tensor: DARE/DELLA masks come from a counter stream keyed by (recipe seed, tensor
name, input), so a merge does not depend on tensor order, batching or worker. Under mergekit-0.1.5 a merge is
mergekit-yaml's: the tensors in its order, the masks from one global RNG stream seeded once by the recipe seed
(its `--random-seed`); `merged_tensors` always merges a recipe whole, so its bytes are reproducible too.
A resident model on a GPU is merged there: each tensor's inputs are copied from the memory-mapped files to the
GPU and the kernel writes into the parameter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

from evomerge.errors import CandidateError, ConfigError, ModelError
from evomerge.io.checkpoint import Checkpoint, check_compatible
from evomerge.merge.layout import Layout, model_names, tied_names
from evomerge.merge.plan import Plan, TensorParams
from evomerge.merge.recipe import Recipe

if TYPE_CHECKING:
    import torch
    from mergekit.merge_methods import MergeMethod
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from evomerge.merge.vocab import VocabPlan


def tensor_seed(seed: int, name: str) -> int:
    """The RNG seed of one tensor's merge: a function of the recipe seed and the tensor name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def merge_tensor(
    method: MergeMethod,
    params: TensorParams,
    tensors: Sequence[torch.Tensor],
    inputs: Sequence[str],
    base_model: str | None,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    kernels: str | None = None,
    seeded: bool = True,
) -> torch.Tensor:
    """One output tensor, with mergekit's parameter binding (its ExecuteMergeMethodTask) and the kernel set
    `kernels` (default: `default_kernels()`): one of evomerge's kernels, else mergekit's own. With `out`,
    the result may be written there. `seeded`: mergekit's kernel draws from the global RNG seeded for this tensor
    by (seed, name); else from the global RNG as it stands (`merged_tensors`' one stream under mergekit-0.1.5)."""
    from mergekit.merge_methods.base import ParameterScope, PerInputValues, TensorEntry, TensorGroup, TensorMetadata
    from mergekit.merge_methods.buffers import copy_non_floating_buffer

    from evomerge.merge.kernels import default_kernels, kernel_merge

    name = params.name
    if dtype is not None:
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    try:
        buffer = copy_non_floating_buffer(tensors, name)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if buffer is not None:
        return buffer
    entries = tuple(TensorEntry(id=m, tensor=t, is_base=m == base_model) for m, t in zip(inputs, tensors))
    group = TensorGroup(entries=entries, metadata=TensorMetadata(name=name))
    bound = dict(params.shared)
    for spec in method.spec.input_parameters:
        chosen = entries if spec.scope == ParameterScope.INPUT else group.non_base
        bound[spec.name] = PerInputValues([(e.id, params.per_input[e.id][spec.name]) for e in chosen])
    try:
        group.validate_tensors()
        direct = out if out_dtype is None or (out is not None and out.dtype == out_dtype) else None
        result = kernel_merge(
            method,
            bound,
            tensors,
            inputs,
            base_model,
            out=direct,
            kernels=kernels or default_kernels(),
            seed=seed,
            name=name,
        )
        if result is None:
            with _seeded(tensor_seed(seed, name), tensors[0].device) if seeded else nullcontext():
                (result,) = method._execute_resolved((group,), [bound])
    except ValueError as exc:
        raise ConfigError(f"tensor {name}: {exc}") from None
    if out_dtype is not None:
        result = result.to(out_dtype)
    return result


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (mergekit's masks draw from it) for one tensor, then restore it."""
    import torch

    if device.type != "cpu":
        with torch.random.fork_rng(devices=[device.index or 0], device_type=device.type):
            torch.manual_seed(seed)
            yield
        return
    # torch.manual_seed also queues lazy CUDA seeding with a stack trace (~3 ms); the CPU generator is enough here
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def torch_dtype(name: str | None) -> torch.dtype | None:
    import torch

    return getattr(torch, name) if name else None


def merged_tensors(
    recipe: Recipe,
    checkpoints: Sequence[Checkpoint],
    targets: dict[str, torch.Tensor] | None = None,
    *,
    plan: Plan | None = None,
    release: bool = False,
    vocab: VocabPlan | None = None,
    truncate: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every output tensor; `checkpoints` (full checkpoints or LoRA adapters over one)
    align with `recipe.input_models()`.

    With `targets` (name -> destination tensor), a kernel may write the result straight into the
    destination and yield it; otherwise the caller copies what is yielded. `plan`: the recipe planned over the
    reference checkpoint (default `plan_for`); `release`: drop each tensor's input pages once the caller has it;
    `vocab` (a `tokenizer_source` merge, keyed by the recipe's model names): the vocabulary tensors' rows are laid
    out in the output vocabulary first (`evomerge.merge.vocab.align_rows`). A LoRA input's delta is formed where
    the destination lives. `truncate` (`--unsafe-truncate-embeddings`): inputs of a tensor whose first dimension
    differs keep their first rows, as many as the smallest has (mergekit's vocabulary truncation).

    The one per-tensor merge loop, shared by `Materializer.apply` and `export_recipe`.
    Raises CandidateError when a merged tensor holds NaN or Inf.
    """
    from evomerge.merge.kernels import MERGEKIT

    inputs = recipe.input_models()
    if len(checkpoints) != len(inputs):
        raise ValueError(f"{len(checkpoints)} checkpoints for {len(inputs)} recipe inputs")
    by_model = dict(zip(inputs, checkpoints))
    plan = plan or plan_for(recipe, checkpoints)
    coefficients = _coefficients(recipe, plan, by_model)
    jobs = plan.jobs()
    if recipe.kernels != MERGEKIT:
        yield from _merge_jobs(recipe, plan, jobs, by_model, targets, vocab, coefficients, truncate, release)
        return
    # mergekit-yaml's order (its schedule sorts the tensors by input name) and its one global stream, seeded once by
    # the recipe seed as --random-seed seeds it: the random masks of dare_* and della* are mergekit's
    first = next(iter(targets.values()), None) if targets else None
    with _seeded(recipe.seed, first.device if first is not None else _cpu()):
        jobs = sorted(jobs, key=lambda job: max(job.sources))
        yield from _merge_jobs(
            recipe, plan, jobs, by_model, targets, vocab, coefficients, truncate, release, seeded=False
        )


def _cpu():
    import torch

    return torch.device("cpu")


def _merge_jobs(recipe, plan, jobs, by_model, targets, vocab, coefficients, truncate, release, seeded: bool = True):
    """`merged_tensors`' loop over the planned jobs, in the given order; `seeded`: each tensor's random draws seeded
    by (recipe seed, tensor name), else taken from the global stream as it stands."""
    from evomerge.merge.kernels.chunks import kernel_threads

    dtype, out_dtype = torch_dtype(recipe.dtype), torch_dtype(recipe.out_dtype)
    models = [e.model for e in recipe.models or []]
    for job in jobs:
        target = targets.get(job.name) if targets is not None else None
        tensors = _job_inputs(job, by_model, target, vocab, coefficients, models, dtype)
        if truncate and len({t.shape[:1] for t in tensors}) > 1:
            rows = min(t.shape[0] for t in tensors)
            tensors = [t[:rows] for t in tensors]
        with kernel_threads():  # single-threaded ops here, evomerge's kernels spread over the CPUs
            result = merge_tensor(
                plan.method,
                job.params,
                tensors,
                job.inputs,
                job.base_model,
                seed=recipe.seed,
                dtype=dtype,
                out_dtype=out_dtype,
                out=target,
                kernels=recipe.kernels,
                seeded=seeded,
            )
            finite = not result.is_floating_point() or not result.numel() or _finite(result)
        if not finite:
            raise CandidateError(f"merged tensor {job.name} has NaN or Inf values ({recipe.merge_method})")
        yield job.name, result
        if release:  # the caller is done with it: drop its input pages from our memory
            for model, src in zip(job.inputs, job.sources):
                by_model[model].release(src)


def _job_inputs(job, by_model: dict[str, Checkpoint], target, vocab, coefficients, models, dtype) -> list:
    """One output tensor's inputs, read where its destination lives (unless row coefficients scale them first:
    their multipliers are on the CPU), laid out in the output vocabulary and scaled by the row coefficients."""
    on_device = target is not None and target.device.type != "cpu"
    device = target.device if on_device and coefficients is None else None
    tensors = [by_model[m].get(src, device) for m, src in zip(job.inputs, job.sources)]
    if vocab is not None and job.name in vocab.tensors:
        tensors = _aligned(vocab, job.inputs, job.base_model, tensors, dtype)
    if coefficients is not None and job.base_model is not None:
        tensors = coefficients.scale(job.name, tensors, models, job.inputs, job.base_model)
    if on_device and device is None:
        tensors = [t.to(target.device) for t in tensors]
    return tensors


_LOADED: dict[str, object] = {}  # sha256 -> RowCoefficients: a search applies the same file to many tensors


def _coefficients(recipe: Recipe, plan: Plan, by_model: dict[str, Checkpoint]):
    """The recipe's row coefficients (evomerge/merge/coefficients.py), checked against its hash and the tensors'
    shapes; None for a recipe without them."""
    from evomerge.merge.coefficients import RowCoefficients

    ref = recipe.evomerge.coefficients if recipe.evomerge is not None else None
    if ref is None:
        return None
    if recipe.slices is not None or recipe.base_model is None:
        raise ConfigError("evomerge.coefficients: row coefficients need the models: form and a base_model")
    loaded = _LOADED.get(ref.sha256)
    if loaded is None:
        loaded = RowCoefficients.load(ref.file, ref.sha256)
        shapes = {job.name: by_model[job.inputs[0]].shape(job.sources[0]) for job in plan.jobs()}
        loaded.check(len(recipe.models or []), shapes)
        _LOADED.clear()  # one file at a time: the next trial's replaces it
        _LOADED[ref.sha256] = loaded
    return loaded


def _aligned(
    vocab: VocabPlan, inputs: Sequence[str], base: str | None, tensors: list[torch.Tensor], dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """One vocabulary tensor of each input in the output vocabulary (in the recipe's dtype, as mergekit casts first)."""
    from evomerge.merge.vocab import align_rows

    if dtype is not None:
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    position = list(inputs).index(base) if base in inputs else None
    overrides = {}
    for entry in vocab.overrides:  # the `tokenizer:` block's tokens
        if entry.model is None:
            overrides[entry.row] = (entry.force, tensors[0].new_zeros(tensors[0].shape[1:]))
        elif entry.model in inputs:
            overrides[entry.row] = (entry.force, tensors[list(inputs).index(entry.model)][entry.source_row])
        else:
            raise ModelError(
                f"field tokenizer.tokens: {entry.model} is not merged into this tensor; use one of its models"
            )
    return align_rows(tensors, [vocab.maps[m] for m in inputs], position, overrides, vocab.rows)


def plan_for(recipe: Recipe, checkpoints: Sequence[Checkpoint], layout: Layout | None = None) -> Plan:
    """`recipe` planned over its reference checkpoint (base_model, else the first input); `layout` defaults to that
    checkpoint's names, with no tied duplicates."""
    by_model = dict(zip(recipe.input_models(), checkpoints))
    ref = by_model[recipe.base_model] if recipe.base_model else checkpoints[0]
    depths = {m: c.num_layers for m, c in by_model.items() if c.num_layers is not None}
    return Plan(recipe, layout=layout or Layout.of(ref), layers_of=depths)


def _finite(t: torch.Tensor) -> bool:
    import torch

    # aminmax propagates NaN and is ~20x cheaper than isfinite(t).all() on large tensors
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def input_key(path: str | os.PathLike) -> str:
    """The id an input model is loaded under (and a recipe's models are mapped to): its resolved path (each half
    of `BASE+ADAPTER` resolved)."""
    from evomerge.io.inputs import ref_key

    return ref_key(path)


def _resident_model(config, dtype, devices: list[str], trust_remote_code: bool):
    """The resident model of `config` in `dtype` (else the config's, else float32), uninitialised: every weight
    is overwritten by `apply`. On the CPU built with the random init skipped (seconds at 1B); on GPUs built empty
    on its devices (no copy in host memory), split over several if asked."""
    import torch

    model_dtype = dtype or _config_dtype(config) or torch.float32
    if devices != ["cpu"]:
        from evomerge.merge.placement import resident_model

        return resident_model(config, model_dtype, devices, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # transformers 5 skips tying under no_init_weights; a tied head shares storage
    return model.eval()


class Materializer:
    """Inputs loaded once (memory-mapped), one resident model; `apply(recipe)` overwrites its weights in place.

    Every tensor is rewritten by each `apply`, so nothing leaks from one recipe to the next; after a failed
    apply (CandidateError) the weights are a mix and the next apply makes them whole again.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def __init__(
        self,
        models: Sequence[str | os.PathLike],
        base_model: str | os.PathLike | None,
        *,
        dtype: str | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        device: str | Sequence[str] = "cpu",
        allow_config_mismatch: bool = False,
        tokenizer_source: str | None = None,
    ):
        """`device`: where the resident model lives and evaluates ("cuda" on a GPU worker), or several devices
        (["cuda:0", "cuda:1"]: the model split over them, `merge.placement`); each merged tensor is computed on
        its parameter's device (its inputs copied from the memory-mapped CPU files, a LoRA adapter's factors with
        them) and written into the parameter. `allow_config_mismatch`: merge models whose config.json differ in
        shape-defining fields when their tensors match. `tokenizer_source` (union, base or a tokenizer folder):
        the resident model and tokenizer take the output vocabulary, and every recipe merges its embeddings and
        head there. An adapter folder among `models` merges over `base_model`, which it shares with the others."""
        from transformers import AutoConfig

        from evomerge.io.inputs import open_inputs

        keys = [input_key(m) for m in models]
        if base_model is not None and input_key(base_model) not in keys:
            keys.append(input_key(base_model))
        self.inputs = keys
        self.base_model = input_key(base_model) if base_model is not None else None
        self._checkpoints = open_inputs(keys, self.base_model, allow_pickle=allow_pickle)
        ref = self.base_model or keys[0]
        check_compatible(
            [self._checkpoints[ref]] + [c for k, c in self._checkpoints.items() if k != ref],
            allow_config_mismatch=allow_config_mismatch,
            vocab_may_differ=tokenizer_source is not None,
        )
        self.tokenizer_source = _source_key(tokenizer_source)
        self.vocab = self._vocab_plan(ref)
        model_dir = str(self._checkpoints[ref].model_dir)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if self.vocab is not None:  # the resident model has one row per token of the output vocabulary
            config.get_text_config().vocab_size = self.vocab.rows
        self.devices = [device] if isinstance(device, str) else list(device)
        self.model = _resident_model(config, torch_dtype(dtype), self.devices, trust_remote_code)
        self.tokenizer = self._tokenizer(model_dir, trust_remote_code)
        self._bind(ref)

    def _vocab_plan(self, ref: str) -> VocabPlan | None:
        from evomerge.merge.vocab import vocab_plan_for

        if self.tokenizer_source is None:
            return None
        return vocab_plan_for(self.tokenizer_source, self._checkpoints, self.base_model or ref)

    def _tokenizer(self, model_dir: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        if self.vocab is None:
            return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        from evomerge.merge.vocab import output_tokenizer

        return output_tokenizer(self.vocab, model_dir)

    def _bind(self, ref: str) -> None:
        """Each stored tensor's place in the resident model (keyed by the stored names)."""
        state = self.model.state_dict()
        names = self._checkpoints[ref].tensor_names()
        renamed = model_names(self.model, names)  # stored name -> the model's (GPT-NeoX: embed_out -> lm_head)
        unknown = [n for n in names if renamed.get(n, n) not in state]
        if unknown:
            raise ModelError(f"{ref}: tensor {unknown[0]} has no place in {type(self.model).__name__}")
        # keyed by the stored names, as recipes, plans and the probe name tensors; a tied head shares its storage
        self._targets = {n: state[renamed.get(n, n)] for n in names}
        covered = {t.data_ptr() for t in self._targets.values()}
        missing = [n for n, t in state.items() if t.numel() and t.data_ptr() not in covered]
        if missing:
            raise ModelError(
                f"{ref}: has no tensor {missing[0]!r}, which {type(self.model).__name__} needs; "
                "use a complete checkpoint"
            )
        self.layout = replace(Layout.of(self._checkpoints[ref]), tied=tied_names(self.model, names, renamed))
        self._depths = {k: c.num_layers for k, c in self._checkpoints.items() if c.num_layers is not None}

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return list(self._checkpoints.values())

    def input_tensor(self, model: str | os.PathLike, name: str) -> torch.Tensor:
        """One input's tensor as a merge reads it: a LoRA adapter's delta formed, vocabulary rows laid out in the
        output vocabulary (`tokenizer_source`)."""
        key = input_key(model)
        if self.vocab is None or name not in self.vocab.tensors:
            return self._checkpoints[key].get(name)
        tensors = [self._checkpoints[k].get(name) for k in self.inputs]
        return _aligned(self.vocab, self.inputs, self.base_model, tensors, None)[self.inputs.index(key)]

    @property
    def targets(self) -> dict[str, torch.Tensor]:
        """name -> the resident model's tensor: what `apply` writes into."""
        return self._targets

    def apply(self, recipe: Recipe) -> None:
        import torch

        wanted = [input_key(m) for m in recipe.input_models()]
        if set(wanted) != set(self.inputs):
            raise ConfigError(
                f"recipe inputs {recipe.input_models()} are not the models this worker loaded ({self.inputs})"
            )
        if recipe.base_model is not None and input_key(recipe.base_model) != self.base_model:
            raise ConfigError(f"recipe base_model {recipe.base_model} is not this worker's base ({self.base_model})")
        if recipe.tokenizer is not None:
            raise ConfigError(
                "recipe field tokenizer: a search merges every candidate into the one vocabulary its config's "
                "tokenizer_source sets; merge a tokenizer: block recipe with `evomerge merge`"
            )
        if recipe.tokenizer_source is not None and _source_key(recipe.tokenizer_source) != self.tokenizer_source:
            raise ConfigError(
                f"recipe tokenizer_source {recipe.tokenizer_source} is not this worker's ({self.tokenizer_source}); "
                "a search merges every candidate into one vocabulary: set tokenizer_source in the search config"
            )
        recipe = recipe.map_models(input_key)  # ids match the loaded checkpoints
        checkpoints = [self._checkpoints[k] for k in recipe.input_models()]
        plan = Plan(recipe, layout=self.layout, layers_of=self._depths)
        if plan.out_layers != self.layout.num_layers:
            raise ConfigError(
                f"this slices: recipe makes a model of {plan.out_layers} layers from {self.layout.num_layers}-layer "
                "inputs; a search merges into a resident model of the base's shape: stack layers with `evomerge merge`"
            )
        with torch.no_grad():
            for name, tensor in merged_tensors(recipe, checkpoints, self._targets, plan=plan, vocab=self.vocab):
                target = self._targets[name]
                if tensor is not target:
                    target.copy_(tensor)


def _source_key(source: str | None) -> str | None:
    """A tokenizer_source as compared between a worker and a recipe (a folder resolved)."""
    if source is None or source in ("union", "base"):
        return source
    return input_key(source)


def _config_dtype(config) -> torch.dtype | None:
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None
