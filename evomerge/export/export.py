"""Export: a recipe merged to an HF checkpoint folder, and a study's trial as its recipe, checkpoint and model card.

    evomerge merge recipe.yaml --out DIR        # export_recipe: sharded safetensors, config, tokenizer, recipe.yaml
    evomerge export runs/demo                   # export_trial: the exported trial ->
    runs/demo/best/{recipe.yaml,model/}
    evomerge export runs/demo --trial 12 --out /tmp/t12

A step above `merge` (the per-tensor merge loop) and `io` (checkpoint reader, shard writer, atomic folders),
which know nothing of each other. Memory stays bounded: inputs are memory-mapped, each tensor's input pages
are released once it is merged, and each merged tensor is written to its shard file at once. Everything is
written to a temp folder next to the output and swapped into place (`io.atomic`): the output holds the
previous complete result or the new one, never a partial one, even if the process is killed. The recipe
written next to the weights records the sha256 of its inputs and of every file written (`evomerge verify`).

A trial's checkpoint is its recipe merged by the same kernels with the same per-tensor seeds, so its
weights are the ones the trial was scored with. Which trial: `validate.guard.exported_trial` (with
`validation:` in the config, the best on the validation splits of the finalists, scored first).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, EvomergeError, ModelError, StudyError
from evomerge.export.modelcard import EVOMERGE_ONLY_DIR, PORTABLE_DIR
from evomerge.io.atomic import atomic_dir, check_replaceable
from evomerge.io.checkpoint import TOKENIZER_FILES, check_compatible
from evomerge.io.digest import file_sha256
from evomerge.io.shards import DEFAULT_SHARD_BYTES, ShardWriter
from evomerge.merge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.io.inputs import Input
    from evomerge.merge.layout import Layout
    from evomerge.merge.plan import Plan
    from evomerge.merge.vocab import VocabPlan

COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json")  # from the base (tokenizer: `tokenizer_source`)
PER_LAYER_FIELDS = ("layer_types",)  # config.json lists with one entry per decoder layer (Qwen2, Gemma 2/3, ...)


def export_recipe(
    recipe: Recipe,
    out_dir: Path | str,
    *,
    seed: int | None = None,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    source: str | os.PathLike | None = None,
    extra_files: Mapping[str, str | Callable[[Recipe], str]] | None = None,
    names: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    allow_config_mismatch: bool = False,
    truncate_embeddings: bool = False,
) -> Path:
    """Merge `recipe` to `out_dir` (HF folder + recipe.yaml with provenance); returns `out_dir`.

    Raises EvomergeError (exit 2) for bad inputs or an output that cannot be written, and then leaves
    nothing behind. `source` (the recipe's file) prefixes errors about the models the recipe names.
    `extra_files` ({name: text}, e.g. a model card; or {name: function of the written recipe, less its
    `outputs`}) are written inside the same atomic swap and recorded. `names` ({input path: published name,
    e.g. a Hub id}) renames inputs in the written recipe; its provenance keeps each input's sha256 under the
    new name. `allow_config_mismatch`: merge models whose config.json differ in shape-defining fields when
    their tensors match. A tied output head stored next to its embeddings is merged once, as the embeddings,
    and not written. `truncate_embeddings` (`--unsafe-truncate-embeddings`, mergekit's option of that name): a
    tensor outside the decoder layers whose rows differ between the inputs keeps the first rows, as many as the
    smallest has; the output's config.json keeps the reference's vocab_size, as mergekit's does.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # fail before hashing and merging
    if seed is not None:
        recipe = recipe.with_provenance(seed=seed)
    inputs = recipe.input_models()
    opened = _open_inputs(recipe, allow_pickle, source)
    checkpoints = [opened[m] for m in inputs]
    ref = checkpoints[inputs.index(recipe.base_model)] if recipe.base_model else checkpoints[0]
    recipe, plan = _checked_plan(recipe, checkpoints, ref, source, allow_config_mismatch, truncate_embeddings)
    vocab = _vocab(recipe, opened, source)
    truncate = truncate_embeddings and vocab is None  # aligned vocabularies need no truncation (mergekit's rule)
    tokenizer_dir = _tokenizer_dir(recipe, ref)
    hashing = ThreadPoolExecutor(len(checkpoints))  # the inputs' sha256 while they merge (hashlib frees the GIL)
    digests = [hashing.submit(c.sha256) for c in checkpoints]

    with _finally_shutdown(hashing), atomic_dir(out_dir) as tmp:
        by_model = dict(zip(inputs, checkpoints))
        shards, size, out_dtype = _write_weights(tmp, recipe, checkpoints, plan, by_model, shard_bytes, vocab, truncate)
        _write_config(tmp, ref, plan, by_model, recipe.out_dtype or recipe.dtype or out_dtype, vocab)
        _write_tokenizer(tmp, ref, tokenizer_dir, vocab, _chat_template(recipe, checkpoints))
        recipe = recipe.with_provenance(inputs={m: d.result() for m, d in zip(inputs, digests)})
        recipe = _write_coefficients(tmp, recipe)
        # what recipe.yaml (and a card) say: adapters in mergekit's BASE+ADAPTER form, Hub names where given
        _write_recipe(tmp, _renamed(recipe, names or {}, _lora_names(opened)), extra_files)
    if log:
        log(f"{len(shards)} shard(s), {size / 1e6:.1f} MB")
    return out_dir


def _checked_plan(
    recipe: Recipe, checkpoints, ref, source, allow_config_mismatch: bool, truncate: bool = False
) -> tuple[Recipe, Plan]:
    """The inputs checked against the base, the recipe's plan over them, and the recipe with its version and kernel
    set recorded (always, so a re-merge gives these bytes whatever its environment)."""
    from evomerge import __version__
    from evomerge.merge.layout import Layout

    # mismatches named against the base; a slices: recipe may take layer ranges from models of other depths
    check_compatible(
        [ref] + [c for c in checkpoints if c is not ref],
        allow_config_mismatch=allow_config_mismatch,
        layers=recipe.slices is None,
        vocab_may_differ=recipe.vocab_source is not None or truncate,
        truncate=truncate,
    )
    plan = _planned(recipe, checkpoints, Layout.of(ref, tied=True), source)
    return recipe.with_provenance(version=__version__, kernels=recipe.kernels, outputs={}), plan


def _write_weights(
    tmp: Path,
    recipe: Recipe,
    checkpoints,
    plan: Plan,
    by_model,
    shard_bytes: int,
    vocab: VocabPlan | None,
    truncate: bool = False,
):
    """Every merged tensor into its shard as it comes (no shard is buffered): (shards, bytes, the output's float
    dtype). `vocab`: a `tokenizer_source` merge's output vocabulary (its embeddings and head have its rows);
    `truncate`: tensors whose rows differ keep the fewest."""
    from evomerge.merge.materialize import merged_tensors

    shapes = [(job.name, _out_shape(job, by_model, vocab, truncate)) for job in plan.jobs()]
    writer = ShardWriter(tmp, shapes, shard_bytes)
    out_dtype = None
    merged = merged_tensors(recipe, checkpoints, plan=plan, release=True, vocab=vocab, truncate=truncate)
    if truncate:
        _check_truncated(plan, by_model)
    for name, tensor in merged:
        writer.add(name, tensor)
        if tensor.is_floating_point():
            out_dtype = out_dtype or str(tensor.dtype).removeprefix("torch.")
        del tensor
    return writer.finish(), writer.total_bytes, out_dtype


def _write_config(tmp: Path, ref, plan: Plan, by_model, out_dtype: str | None, vocab: VocabPlan | None) -> None:
    """config.json for the output's shape and vocabulary; its dtype is the recipe's `out_dtype`, else its `dtype`
    (as mergekit writes it, whatever dtype a method's kernel returns), else the merged tensors'."""
    config = _out_config(ref.config, plan, by_model, vocab)
    if out_dtype:
        config["dtype"] = out_dtype
        config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_coefficients(tmp: Path, recipe: Recipe) -> Recipe:
    """An evomerge-only recipe's coefficient file beside it (the recipe then names it relative to itself),
    checked against the hash the recipe records; other recipes unchanged."""
    if not recipe.evomerge_only:
        return recipe
    from evomerge.merge.coefficients import FILE_NAME

    ref = recipe.evomerge.coefficients
    shutil.copyfile(ref.file, tmp / FILE_NAME)
    if file_sha256(tmp / FILE_NAME) != ref.sha256:
        raise ConfigError(f"evomerge.coefficients.file: {ref.file} changed while it was merged; merge again")
    return recipe.with_provenance(coefficients=ref.model_copy(update={"file": FILE_NAME}))


def _write_recipe(tmp: Path, published: Recipe, extra_files) -> None:
    """The extra files (a model card), then recipe.yaml with the sha256 of every file beside it."""
    for fname, content in (extra_files or {}).items():
        if Path(fname).name != fname or fname == "recipe.yaml":
            raise ValueError(f"extra file {fname!r}: a plain file name other than recipe.yaml")
        (tmp / fname).write_text(content(published) if callable(content) else content, encoding="utf-8")
    outputs = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
    published.with_provenance(outputs=outputs).dump(tmp / "recipe.yaml")


@contextmanager
def _finally_shutdown(pool: ThreadPoolExecutor) -> Iterator[None]:
    try:
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _open_inputs(recipe: Recipe, allow_pickle: bool, source: str | os.PathLike | None) -> dict[str, Input]:
    """Every input model opened (each full checkpoint once: an adapter's base shares the base_model's mapping);
    errors also name the recipe file and field that point at the model."""
    from evomerge.io.inputs import open_inputs

    shared: dict = {}
    opened: dict[str, Input] = {}
    for model in recipe.input_models():
        try:
            opened.update(open_inputs([model], recipe.base_model, allow_pickle=allow_pickle, opened=shared))
        except EvomergeError as exc:
            where = f"{source}: " if source is not None else ""
            hub = _hub_id(model, source)
            if hub is not None:  # a published recipe names its inputs by Hub id; evomerge never downloads
                raise type(exc)(
                    f"{where}field {recipe.field_of(model)}: {hub} is not a local folder (looked for {model}); "
                    f"evomerge reads local folders only and never downloads: if {hub} is a Hugging Face Hub id, "
                    f"download it (`hf download {hub} --local-dir DIR`) and write DIR in its place in the recipe"
                ) from None
            raise type(exc)(f"{where}field {recipe.field_of(model)}: {exc}") from None
    return opened


def _vocab(recipe: Recipe, opened: Mapping[str, Input], source: str | os.PathLike | None) -> VocabPlan | None:
    """The output vocabulary of a `tokenizer_source` recipe (None without one); errors name the file."""
    from evomerge.merge.vocab import vocab_plan_for

    if recipe.vocab_source is None:
        return None
    field = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    try:
        return vocab_plan_for(recipe.vocab_source, opened, recipe.base_model, field=field, block=recipe.tokenizer)
    except EvomergeError as exc:
        where = f"{source}: " if source is not None else ""
        raise type(exc)(f"{where}{exc}") from None


def _out_shape(job, by_model: Mapping[str, Input], vocab: VocabPlan | None, truncate: bool = False) -> tuple[int, ...]:
    shape = tuple(by_model[job.inputs[0]].shape(job.sources[0]))
    if truncate and shape:
        shape = (min(by_model[m].shape(src)[0] for m, src in zip(job.inputs, job.sources)), *shape[1:])
    return (vocab.rows, *shape[1:]) if vocab is not None and job.name in vocab.tensors else shape


def _write_tokenizer(
    tmp: Path, ref: Input, tokenizer_dir: Path, vocab: VocabPlan | None, chat_template: str | None = None
) -> None:
    """The output's tokenizer (a union that adds tokens: the base's with them added, written by transformers; with a
    `chat_template`: the tokenizer loaded, given the template and written by transformers, as mergekit writes it;
    else the named tokenizer's files, copied) and the reference's generation_config.json."""
    from evomerge.io.tokenizers import has_tokenizer, load_tokenizer

    built = vocab is not None and bool(vocab.additions)
    if chat_template is not None and not built and not has_tokenizer(tokenizer_dir):
        _warn(f"field chat_template: {tokenizer_dir} has no tokenizer, so the output has none to hold the template")
        chat_template = None
    if built or chat_template is not None:
        from evomerge.merge.vocab import output_tokenizer

        tokenizer = output_tokenizer(vocab, ref.model_dir) if built else load_tokenizer(tokenizer_dir)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(str(tmp))
        built = True
    for fname in COPIED_FILES:
        if built and fname != "generation_config.json":
            continue
        src = (ref.model_dir if fname == "generation_config.json" else tokenizer_dir) / fname
        if src.is_file():
            shutil.copyfile(src, tmp / fname)


def _lora_names(opened: Mapping[str, Input]) -> dict[str, str]:
    from evomerge.io.inputs import published_refs

    return published_refs(opened)


def _hub_id(model: str, source: str | os.PathLike | None) -> str | None:
    """`org/name` when a missing input, relative to the recipe's folder, reads like a Hub id."""
    import re

    if source is None or os.path.exists(model):
        return None
    rel = os.path.relpath(model, Path(source).resolve().parent)
    return rel if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", rel) else None


def _renamed(recipe: Recipe, names: Mapping[str, str], forms: Mapping[str, str] | None = None) -> Recipe:
    """`recipe` with its inputs as published: `forms` (reference -> mergekit's form: a bare adapter folder as
    `BASE+ADAPTER`) first, then `names` (a local folder -> its Hub id) on each folder, provenance included."""
    from evomerge.io.inputs import split_ref

    forms = forms or {}
    if not names and not forms:
        return recipe

    def rename(ref: str) -> str:
        model, adapter = split_ref(forms.get(ref, ref))
        return (
            names.get(model, model) if adapter is None else f"{names.get(model, model)}+{names.get(adapter, adapter)}"
        )

    renamed = recipe.map_models(rename)
    if recipe.evomerge is not None:
        renamed = renamed.with_provenance(inputs={rename(m): d for m, d in recipe.evomerge.inputs.items()})
    return renamed


def _planned(recipe: Recipe, checkpoints: Sequence[Input], layout: Layout, source: str | os.PathLike | None) -> Plan:
    """The recipe planned over the reference checkpoint; errors (a layer range past a model's depth) name the file."""
    from evomerge.merge.materialize import plan_for

    try:
        return plan_for(recipe, checkpoints, layout)
    except EvomergeError as exc:
        where = f"{source}: " if source is not None else ""
        raise type(exc)(f"{where}{exc}") from None


def _out_config(config: dict, plan: Plan, by_model: Mapping[str, Input], vocab: VocabPlan | None = None) -> dict:
    """The reference's config.json; with `vocab`, its vocab_size the output vocabulary's; after a `slices:` recipe,
    with the output's layer count, and per-layer lists (`layer_types`) taken from the layer each output layer
    came from."""
    from evomerge.io.checkpoint import config_field

    config = copy.deepcopy(config)
    if vocab is not None:
        key, _ = config_field(config, "vocab_size")
        (config if key in config or "text_config" not in config else config["text_config"])[key] = vocab.rows
    if plan.recipe.slices is None:
        return config
    key, _ = config_field(config, "num_hidden_layers")
    target = config if key in config else config.setdefault("text_config", {})
    target[key] = plan.out_layers
    for name in PER_LAYER_FIELDS:
        if isinstance(target.get(name), list):
            target[name] = [_layer_value(by_model[m].config, name, i, target[name]) for m, i in plan.layer_origins()]
    return config


def _layer_value(config: dict, name: str, layer: int, fallback: list):
    values = config.get(name) or (config.get("text_config") or {}).get(name) or fallback
    return values[layer] if layer < len(values) else values[-1]


def _chat_template(recipe: Recipe, checkpoints: Sequence[Input]) -> str | None:
    """The template the output's tokenizer gets: the recipe's `chat_template` (a name mergekit ships, a Jinja
    template, or `auto`: the inputs' most common one); None without one."""
    from evomerge.io.tokenizers import auto_chat_template, chat_template_text

    if recipe.chat_template is None:
        return None
    text = chat_template_text(recipe.chat_template)
    return text if text is not None else auto_chat_template([c.model_dir for c in checkpoints])


def _check_truncated(plan: Plan, by_model: Mapping[str, Input]) -> None:
    """One line naming the tensors `--unsafe-truncate-embeddings` cuts (mergekit warns of the same); ModelError for
    one inside a decoder layer (only vocabulary rows are cut)."""
    from evomerge.merge.layout import layer_index

    cut = []
    for job in plan.jobs():
        rows = {by_model[m].shape(src)[0] for m, src in zip(job.inputs, job.sources) if by_model[m].shape(src)}
        if len(rows) > 1 and layer_index(job.name) is not None:
            raise ModelError(
                f"tensor {job.name}: its rows differ between the inputs ({sorted(rows)}) inside a decoder layer; "
                "--unsafe-truncate-embeddings cuts only vocabulary rows (embeddings, head): merge models of one shape"
            )
        if len(rows) > 1:
            cut.append(f"{job.name} to {min(rows)} of {max(rows)} rows")
    if cut:
        _warn(
            f"--unsafe-truncate-embeddings: {', '.join(cut)}; this assumes the models share token ids for those rows "
            "(tokenizer_source or a tokenizer: block aligns them by token instead)"
        )


def _warn(message: str) -> None:
    import warnings

    from evomerge.errors import RecipeWarning

    warnings.warn(RecipeWarning(message), stacklevel=2)


def _tokenizer_dir(recipe: Recipe, ref: Input) -> Path:
    """The folder whose tokenizer files the output copies: the base's, or the one tokenizer_source names."""
    source = recipe.vocab_source
    if source in (None, "base", "union"):  # a union that adds nothing is the base's
        return Path(ref.model_dir)
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"field tokenizer_source: {source} is not a folder; point it at a folder with tokenizer.json")
    return path


@dataclass
class ExportResult:
    trial: int
    objective: float
    recipe: Path
    model_dir: Path
    heldout: bool = False  # the model card has the report's held-out scores
    beside: ExportResult | None = None  # the other recipe of an evomerge-only winner's pair, in a folder of OUT

    def __str__(self) -> str:
        text = f"trial {self.trial} (objective {self.objective:.4f}): {self.recipe} and {self.model_dir}"
        if self.beside is not None:
            what = "portable" if self.beside.recipe.parent.name == PORTABLE_DIR else EVOMERGE_ONLY_DIR
            text += f"\nbeside it, the {what} one: {self.beside}"
        return text


@dataclass
class _Prepared:
    """One trial ready to write: its recipe with provenance and its model card (a function of the published
    recipe)."""

    trial: Any
    objective: float
    validation: Any  # the guard's `Validation`, or None
    recipe: Recipe
    card: Callable[[Recipe], str]

    def result(self, folder: Path, comparison, pair, beside: ExportResult | None = None) -> ExportResult:
        from evomerge.export.modelcard import this_row

        heldout = comparison is not None and this_row(comparison, pair, self.trial) is not None
        return ExportResult(
            self.trial.number, self.objective, folder / "recipe.yaml", folder / "model", heldout, beside
        )


def export_trial(
    run_dir: Path | str,
    out: Path | str | None = None,
    trial: int | None = None,
    log: Callable[[str], None] | None = print,
    hub_ids: Mapping[str, str] | None = None,
    kernels: str | None = None,
    portable: bool = False,
) -> ExportResult:
    """Write `OUT/recipe.yaml` and `OUT/model/` (default OUT: `RUN_DIR/best`) for the exported trial (or `trial`).

    The exported trial is `validate.guard.exported_trial`: the best on the validation tasks when the config has
    `validation:` (the finalists are scored first, once, on the config's workers), else the best search objective.
    When it is evomerge-only, the best portable trial (`validate.guard.portable_trial`, which `mergekit-yaml`
    reproduces) is written beside it to `OUT/portable/`; `portable` swaps them: the portable trial in `OUT/`, the
    evomerge-only one in `OUT/evomerge-only/`. `hub_ids` ({local input folder: org/name}) names those inputs by
    their Hub ids in the recipe and the model card's metadata. The card has held-out scores when `evomerge report`
    scored this trial before. `kernels` replaces the kernel set the trial was scored with (its weights then differ
    from the scored ones for the sparsifying methods).
    """
    from evomerge.config.rundir import RunDir
    from evomerge.export.modelcard import published_names
    from evomerge.study.study import open_run

    cfg, study = open_run(run_dir)
    names = published_names(cfg, hub_ids or {})  # bad --hub-id pairs fail before any work
    chosen = _chosen(cfg, study, trial, log)
    pair = _pair(cfg, study, chosen, portable, log)
    comparison = _report_of(Path(run_dir), cfg.name, chosen)
    main = pair.main if pair else chosen
    first = _prepare(cfg, study, main, names, kernels, comparison, pair)
    out = Path(out) if out is not None else RunDir.at(run_dir).best
    second = _prepare(cfg, study, pair.beside, names, kernels, comparison, pair) if pair else None
    if log:
        for prepared, where in [(first, out), *([(second, out / pair.folder)] if second else [])]:
            how = f", validation {prepared.validation.objective:.4f}" if prepared.validation is not None else ""
            log(f"exporting trial {prepared.trial.number} (objective {prepared.objective:.4f}{how}) to {where}")
    with atomic_dir(out) as tmp:  # recipe.yaml, model/ and its card (and the pair's other one) are published together
        _write_trial(tmp, first, cfg, names)
        if second is not None:
            _write_trial(tmp / pair.folder, second, cfg, names)
    beside = second.result(out / pair.folder, comparison, pair) if second is not None else None
    return first.result(out, comparison, pair, beside)


def _prepare(cfg, study, chosen, names, kernels: str | None, comparison, pair) -> _Prepared:
    """A trial's recipe (as scored, with provenance) and its model card."""
    from evomerge.export.modelcard import model_card
    from evomerge.study.record import TrialRecord
    from evomerge.study.trials import complete_trials, objective_of
    from evomerge.validate.guard import stored

    objective = objective_of(chosen)
    validation = stored(cfg, study).get(chosen.number)
    recipe = _trial_recipe(cfg, chosen, objective, validation, kernels)
    baselines = [t for t in complete_trials(study) if TrialRecord.from_trial(t).alone is not None]
    architectures = json.loads((Path(cfg.base_model) / "config.json").read_text()).get("architectures") or []

    def card(published: Recipe) -> str:
        return model_card(
            cfg, published, chosen, objective, validation, comparison, names, baselines, architectures, pair
        )

    return _Prepared(chosen, objective, validation, recipe, card)


def _write_trial(tmp: Path, prepared: _Prepared, cfg, names) -> None:
    """`tmp/model/` (the checkpoint, its card and recipe), `tmp/recipe.yaml` and an evomerge-only recipe's
    coefficient file beside it, as the recipe names it."""
    recipe = prepared.recipe
    export_recipe(
        recipe,
        tmp / "model",
        seed=recipe.seed,
        extra_files={"README.md": prepared.card},
        names=names,
        allow_config_mismatch=cfg.allow_config_mismatch,
    )
    shutil.copyfile(tmp / "model" / "recipe.yaml", tmp / "recipe.yaml")  # with the inputs' and outputs' sha256
    if recipe.evomerge is not None and recipe.evomerge.coefficients is not None:  # its coefficient file beside it
        from evomerge.merge.coefficients import FILE_NAME

        shutil.copyfile(tmp / "model" / FILE_NAME, tmp / FILE_NAME)


def _pair(cfg, study, chosen, portable: bool, log):
    """The pair an evomerge-only `chosen` is exported with (None when `chosen` is portable or no trial is): which
    one is the main recipe (`portable`: the portable one) and the folder of the other."""
    from evomerge.export.modelcard import Pair
    from evomerge.validate.guard import is_portable, portable_trial, stored

    if is_portable(chosen):
        if portable and log:
            log(f"trial {chosen.number} is portable: --portable exports it as it is")
        return None
    other = portable_trial(cfg, study, chosen)
    if other is None:
        if portable:
            raise StudyError(
                f"--portable: study {cfg.name!r} has no trial that mergekit-yaml reproduces (every COMPLETE trial is "
                "evomerge-only); export without --portable"
            )
        if log:
            log(f"trial {chosen.number} is evomerge-only and no trial is portable: nothing is exported beside it")
        return None
    results = stored(cfg, study)
    validations = {t.number: results[t.number].objective for t in (chosen, other) if t.number in results}
    return Pair(winner=chosen, portable=other, swapped=portable, validations=validations)


def _chosen(cfg, study, trial: int | None, log):
    """COMPLETE trial `trial`, or THE exported trial (the guard's finalists validated first)."""
    from evomerge.study.trials import best_trial, trial_by_number
    from evomerge.validate.guard import exported_trial, validate_top

    if trial is not None:
        return trial_by_number(study, trial)
    if best_trial(study) is None:  # a clear error before validating an empty study
        raise StudyError(f"study {study.study_name!r} has no COMPLETE trial yet; run `evomerge search` first")
    validate_top(cfg, study, log=log)
    return exported_trial(cfg, study)


def _trial_recipe(cfg, chosen, objective: float, validation, kernels: str | None) -> Recipe:
    """The trial's recipe as it was scored, with its provenance: study, trial, scores, how they were measured (and
    the guard's validation), and another kernel set where `kernels` asks for one."""
    from evomerge.study.record import TrialRecord

    record = TrialRecord.from_trial(chosen)
    extra = {
        "objective": objective,
        "metrics": {t.name: t.metric for t in cfg.tasks.search},
        "task_seed": cfg.seed,
        "sampler": cfg.sampler.name,
        "sampler_seed": cfg.sampler_seed,
        "storage": cfg.storage_url,
    }
    if validation is not None:
        extra["validation"] = {
            "scores": validation.task_scores(cfg),
            "objective": validation.objective,
            "metrics": {t.name: t.metric for t in cfg.validation.tasks},
            "top_k": cfg.validation.top_k,
        }
    recipe = Recipe.from_yaml(record.recipe, source=f"trial {chosen.number} recipe")
    if cfg.tokenizer_source is not None and recipe.tokenizer_source is None:  # the vocabulary the trial was scored in
        recipe = recipe.model_copy(update={"tokenizer_source": cfg.tokenizer_source})
    if kernels is not None:
        recipe = recipe.with_provenance(kernels=kernels)
    return recipe.with_provenance(
        study=cfg.name, trial=chosen.number, scores=record.task_values(cfg.tasks.search), extra=extra
    )


def _report_of(run_dir: Path, study: str, trial):
    """The report's comparison when `evomerge report` scored this trial as its evolved row (after the trial
    completed), else None. (Its portable row, if any, is the card's when it is the exported pair's.)"""
    from evomerge.report.compare import stored_comparison

    stored = stored_comparison(run_dir)
    if stored is None:
        return None
    comparison, written = stored
    done = trial.datetime_complete.timestamp() if trial.datetime_complete else float("inf")
    same = comparison.study == study and comparison.best_trial == trial.number and written >= done
    return comparison if same else None


__all__ = ["EVOMERGE_ONLY_DIR", "PORTABLE_DIR", "ExportResult", "export_recipe", "export_trial"]
