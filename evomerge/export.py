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
weights are the ones the trial was scored with. Which trial: `search.guard.exported_trial` (with
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
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError, EvomergeError, StudyError
from evomerge.io.atomic import atomic_dir, check_replaceable
from evomerge.io.checkpoint import TOKENIZER_FILES, Checkpoint, check_compatible
from evomerge.io.digest import file_sha256
from evomerge.io.shards import DEFAULT_SHARD_BYTES, ShardWriter
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.merge.layout import Layout
    from evomerge.merge.plan import Plan

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
) -> Path:
    """Merge `recipe` to `out_dir` (HF folder + recipe.yaml with provenance); returns `out_dir`.

    Raises EvomergeError (exit 2) for bad inputs or an output that cannot be written, and then leaves
    nothing behind. `source` (the recipe's file) prefixes errors about the models the recipe names.
    `extra_files` ({name: text}, e.g. a model card; or {name: function of the written recipe, less its
    `outputs`}) are written inside the same atomic swap and recorded. `names` ({input path: published name,
    e.g. a Hub id}) renames inputs in the written recipe; its provenance keeps each input's sha256 under the
    new name. `allow_config_mismatch`: merge models whose config.json differ in shape-defining fields when
    their tensors match. A tied output head stored next to its embeddings is merged once, as the embeddings,
    and not written.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # fail before hashing and merging
    if seed is not None:
        recipe = recipe.with_provenance(seed=seed)
    inputs = recipe.input_models()
    checkpoints = [_open(recipe, m, allow_pickle, source) for m in inputs]
    ref = checkpoints[inputs.index(recipe.base_model)] if recipe.base_model else checkpoints[0]
    recipe, plan = _checked_plan(recipe, checkpoints, ref, source, allow_config_mismatch)
    hashing = ThreadPoolExecutor(len(checkpoints))  # the inputs' sha256 while they merge (hashlib frees the GIL)
    digests = [hashing.submit(c.sha256) for c in checkpoints]

    with _finally_shutdown(hashing), atomic_dir(out_dir) as tmp:
        by_model = dict(zip(inputs, checkpoints))
        shards, size, out_dtype = _write_weights(tmp, recipe, checkpoints, plan, by_model, shard_bytes)
        _write_config(tmp, ref, plan, by_model, out_dtype, _tokenizer_dir(recipe, ref))
        recipe = recipe.with_provenance(inputs={m: d.result() for m, d in zip(inputs, digests)})
        recipe = _write_coefficients(tmp, recipe)
        _write_recipe(tmp, _renamed(recipe, names) if names else recipe, extra_files)
    if log:
        log(f"{len(shards)} shard(s), {size / 1e6:.1f} MB")
    return out_dir


def _checked_plan(recipe: Recipe, checkpoints, ref, source, allow_config_mismatch: bool) -> tuple[Recipe, Plan]:
    """The inputs checked against the base, the recipe's plan over them, and the recipe with its version and kernel
    set recorded (always, so a re-merge gives these bytes whatever its environment)."""
    from evomerge import __version__
    from evomerge.merge.layout import Layout

    # mismatches named against the base; a slices: recipe may take layer ranges from models of other depths
    check_compatible(
        [ref] + [c for c in checkpoints if c is not ref],
        allow_config_mismatch=allow_config_mismatch,
        layers=recipe.slices is None,
    )
    plan = _planned(recipe, checkpoints, Layout.of(ref, tied=True), source)
    return recipe.with_provenance(version=__version__, kernels=recipe.kernels, outputs={}), plan


def _write_weights(tmp: Path, recipe: Recipe, checkpoints, plan: Plan, by_model, shard_bytes: int):
    """Every merged tensor into its shard as it comes (no shard is buffered): (shards, bytes, the output's float
    dtype)."""
    from evomerge.merge.materialize import merged_tensors

    shapes = [(job.name, by_model[job.inputs[0]].shape(job.sources[0])) for job in plan.jobs()]
    writer = ShardWriter(tmp, shapes, shard_bytes)
    out_dtype = None
    for name, tensor in merged_tensors(recipe, checkpoints, plan=plan, release=True):
        writer.add(name, tensor)
        if tensor.is_floating_point():
            out_dtype = out_dtype or str(tensor.dtype).removeprefix("torch.")
        del tensor
    return writer.finish(), writer.total_bytes, out_dtype


def _write_config(tmp: Path, ref, plan: Plan, by_model, out_dtype: str | None, tokenizer_dir: Path) -> None:
    """config.json for the output's shape and dtype; the tokenizer and generation config copied."""
    config = _out_config(ref.config, plan, by_model)
    if out_dtype:
        config["dtype"] = out_dtype
        config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname in COPIED_FILES:
        src = (ref.path if fname == "generation_config.json" else tokenizer_dir) / fname
        if src.is_file():
            shutil.copyfile(src, tmp / fname)


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


def _open(recipe: Recipe, model: str, allow_pickle: bool, source: str | os.PathLike | None) -> Checkpoint:
    """The input checkpoint; errors also name the recipe file and field that point at it."""
    try:
        return Checkpoint(model, allow_pickle=allow_pickle)
    except EvomergeError as exc:
        where = f"{source}: " if source is not None else ""
        hub = _hub_id(model, source)
        if hub is not None:  # a published recipe names its inputs by Hub id; evomerge never downloads
            raise type(exc)(
                f"{where}field {recipe.field_of(model)}: {hub} is not a local folder (looked for {model}); evomerge "
                f"reads local folders only and never downloads: if {hub} is a Hugging Face Hub id, download it "
                f"(`hf download {hub} --local-dir DIR`) and write DIR in its place in the recipe"
            ) from None
        raise type(exc)(f"{where}field {recipe.field_of(model)}: {exc}") from None


def _hub_id(model: str, source: str | os.PathLike | None) -> str | None:
    """`org/name` when a missing input, relative to the recipe's folder, reads like a Hub id."""
    import re

    if source is None or os.path.exists(model):
        return None
    rel = os.path.relpath(model, Path(source).resolve().parent)
    return rel if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", rel) else None


def _renamed(recipe: Recipe, names: Mapping[str, str]) -> Recipe:
    """`recipe` with its inputs named by `names` (path -> published name), provenance sha256 included."""
    rename = lambda m: names.get(m, m)  # noqa: E731
    models = [e.model_copy(update={"model": rename(e.model)}) for e in recipe.models]
    update: dict = {"models": models, "base_model": rename(recipe.base_model) if recipe.base_model else None}
    renamed = recipe.model_copy(update=update)
    if recipe.evomerge is not None:
        renamed = renamed.with_provenance(inputs={rename(m): d for m, d in recipe.evomerge.inputs.items()})
    return renamed


def _planned(
    recipe: Recipe, checkpoints: Sequence[Checkpoint], layout: Layout, source: str | os.PathLike | None
) -> Plan:
    """The recipe planned over the reference checkpoint; errors (a layer range past a model's depth) name the file."""
    from evomerge.merge.materialize import plan_for

    try:
        return plan_for(recipe, checkpoints, layout)
    except EvomergeError as exc:
        where = f"{source}: " if source is not None else ""
        raise type(exc)(f"{where}{exc}") from None


def _out_config(config: dict, plan: Plan, by_model: Mapping[str, Checkpoint]) -> dict:
    """The reference's config.json; after a `slices:` recipe, with the output's layer count, and per-layer lists
    (`layer_types`) taken from the layer each output layer came from."""
    from evomerge.io.checkpoint import config_field

    config = copy.deepcopy(config)
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


def _tokenizer_dir(recipe: Recipe, ref: Checkpoint) -> Path:
    source = recipe.tokenizer_source
    if source in (None, "base", "union"):  # inputs share one vocabulary (checked), so "union" is the base's
        return ref.path
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

    def __str__(self) -> str:
        return f"trial {self.trial} (objective {self.objective:.4f}): {self.recipe} and {self.model_dir}"


def export_trial(
    run_dir: Path | str,
    out: Path | str | None = None,
    trial: int | None = None,
    log: Callable[[str], None] | None = print,
    hub_ids: Mapping[str, str] | None = None,
    kernels: str | None = None,
) -> ExportResult:
    """Write `OUT/recipe.yaml` and `OUT/model/` (default OUT: `RUN_DIR/best`) for the exported trial (or `trial`).

    The exported trial is `search.guard.exported_trial`: the best on the validation tasks when the config has
    `validation:` (the finalists are scored first, once, on the config's workers), else the best search objective.
    `hub_ids` ({local input folder: org/name}) names those inputs by their Hub ids in the recipe and the model
    card's metadata. The card has held-out scores when `evomerge report` scored this trial before. `kernels`
    replaces the kernel set the trial was scored with (its weights then differ from the scored ones for the
    sparsifying methods).
    """
    from evomerge.modelcard import model_card, published_names
    from evomerge.search.guard import stored
    from evomerge.search.record import TrialRecord
    from evomerge.search.study import open_run
    from evomerge.search.trials import complete_trials, objective_of

    cfg, study = open_run(run_dir)
    names = published_names(cfg, hub_ids or {})  # bad --hub-id pairs fail before any work
    chosen = _chosen(cfg, study, trial, log)
    objective = objective_of(chosen)
    validation = stored(cfg, study).get(chosen.number)
    recipe = _trial_recipe(cfg, chosen, objective, validation, kernels)
    out = Path(out) if out is not None else Path(run_dir) / "best"
    if log:
        how = f", validation {validation.objective:.4f}" if validation is not None else ""
        log(f"exporting trial {chosen.number} (objective {objective:.4f}{how}) to {out}")
    comparison = _report_of(Path(run_dir), cfg.name, chosen)
    baselines = [t for t in complete_trials(study) if TrialRecord.from_trial(t).alone is not None]
    architectures = json.loads((Path(cfg.base_model) / "config.json").read_text()).get("architectures") or []

    def card(published: Recipe) -> str:
        return model_card(cfg, published, chosen, objective, validation, comparison, names, baselines, architectures)

    with atomic_dir(out) as tmp:  # recipe.yaml, model/ and its card are published together
        export_recipe(
            recipe,
            tmp / "model",
            seed=recipe.seed,
            extra_files={"README.md": card},
            names=names,
            allow_config_mismatch=cfg.allow_config_mismatch,
        )
        shutil.copyfile(tmp / "model" / "recipe.yaml", tmp / "recipe.yaml")  # with the inputs' and outputs' sha256
        if recipe.evomerge_only:  # its coefficient file beside it too, as the recipe names it
            from evomerge.merge.coefficients import FILE_NAME

            shutil.copyfile(tmp / "model" / FILE_NAME, tmp / FILE_NAME)
    return ExportResult(chosen.number, objective, out / "recipe.yaml", out / "model", heldout=comparison is not None)


def _chosen(cfg, study, trial: int | None, log):
    """COMPLETE trial `trial`, or THE exported trial (the guard's finalists validated first)."""
    from evomerge.search.guard import exported_trial, validate_top
    from evomerge.search.trials import best_trial, trial_by_number

    if trial is not None:
        return trial_by_number(study, trial)
    if best_trial(study) is None:  # a clear error before validating an empty study
        raise StudyError(f"study {study.study_name!r} has no COMPLETE trial yet; run `evomerge search` first")
    validate_top(cfg, study, log=log)
    return exported_trial(cfg, study)


def _trial_recipe(cfg, chosen, objective: float, validation, kernels: str | None) -> Recipe:
    """The trial's recipe as it was scored, with its provenance: study, trial, scores, how they were measured (and
    the guard's validation), and another kernel set where `kernels` asks for one."""
    from evomerge.search.record import TrialRecord

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
    if kernels is not None:
        recipe = recipe.with_provenance(kernels=kernels)
    return recipe.with_provenance(
        study=cfg.name, trial=chosen.number, scores=record.task_values(cfg.tasks.search), extra=extra
    )


def _report_of(run_dir: Path, study: str, trial):
    """The report's comparison when `evomerge report` scored this trial as its evolved row (after the trial
    completed), else None."""
    from evomerge.report.compare import Comparison

    path = run_dir / "report" / "comparison.json"
    try:
        comparison = Comparison.model_validate_json(path.read_text(encoding="utf-8"))
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return None
    done = trial.datetime_complete.timestamp() if trial.datetime_complete else float("inf")
    same = comparison.study == study and comparison.best_trial == trial.number and written >= done
    return comparison if same else None


__all__ = ["ExportResult", "export_recipe", "export_trial"]
