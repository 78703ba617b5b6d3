"""The candidate evaluator: one resident model on a device, a recipe materialized into it, scored on a named task set.

    ev = Evaluator(["zoo/add", "zoo/reverse"], "zoo/base", {"search": [TaskSpec(name="zoo_add_search", subset=100)]})
    result = ev.evaluate(recipe, "search")          # Evaluation: scores, objective, merge and eval seconds
    ev.load(alone("zoo/add", ev.inputs)); ev.score("search")     # a source model alone, scored the same way

Every "merge a recipe and score it" in evomerge goes through this class: the search's Ray workers and its
in-process pool (`run.pool`), the overfitting guard (`validate.guard`), the report (`report.compare`),
the probe (`analysis.probe`) and `scripts/zoo_table.py`. The inputs are loaded once (memory-mapped) and each
task set's Scorer is built once; a candidate then costs one in-place merge plus one evaluation.

"A model alone" has one definition: `alone(model, inputs)`, the linear recipe with weight 1 on it and 0 on
every other input, whose merge is the model's exact weights (bit-exact in fp32), materialized like any recipe.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from evomerge.errors import EvomergeError, TaskError
from evomerge.merge.materialize import input_key
from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.scoring.scorer import Scorer, Scores
from evomerge.scoring.tasks import TaskSpec

if TYPE_CHECKING:
    import torch

    from evomerge.config.schema import SearchConfig
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merge.materialize import Materializer


@dataclass
class Evaluation:
    """One candidate scored on one task set: what the evaluator returns, and what a worker hands the driver (the
    one result type between them, `run.pool.JobResult`), with where and when it ran, or why it failed.
    Mutable: the driver notes why it fails a result the worker called fine (a non-finite objective)."""

    task_set: str = ""
    scores: Scores = field(default_factory=dict)  # {leaf task: {metric: value}}, every metric lm-eval reports
    metrics: dict[str, str] = field(default_factory=dict)  # {leaf task: the metric its spec reads}
    units: dict[str, float] = field(default_factory=dict)  # {leaf task: that metric on the 0-1 objective scale}
    objective: float = float("nan")  # the specs' weighted mean of `units`
    merge_s: float = 0.0
    eval_s: float = 0.0
    # per-example values keyed by example index: the metric (`score(examples=True)`), or the objective's units
    # (`evaluate_examples`, where `smooth` may mix in the answer's probability); empty unless asked
    examples: dict[str, dict[int, float]] = field(default_factory=dict)
    n_examples: int = 0  # examples scored (per-example scoring only)
    stopped: bool = False  # staged evaluation stopped it early: `objective` is the paired estimate
    # -- where and when a worker ran it (run/pool.py), or why it failed ---------------------------------
    worker: str = ""  # "host:pid"
    busy_s: float = 0.0  # the whole call in the worker (parse + merge + eval)
    wait_s: float = 0.0  # the worker idle before this call (waiting on the driver)
    started: float = 0.0  # wall clock (time.time) on the worker's host when it began and ended this call
    ended: float = 0.0
    error: str | None = None  # the candidate failed: why (a user error, NaN/Inf, out of memory, a dead worker)
    worker_died: bool = False  # the worker process died (OOM, segfault, kill); the pool replaced it
    was_running: bool = False  # with worker_died: this job was the one running, not one queued behind it

    @property
    def ok(self) -> bool:
        return self.error is None

    def values(self) -> dict[str, float]:
        """{leaf task: its metric's value, as lm-eval reports it}."""
        return {leaf: self.scores[leaf][metric] for leaf, metric in self.metrics.items()}

    def non_finite(self) -> list[str]:
        """`task.metric` of every NaN or Inf score (and `objective` if that is)."""
        bad = [f"{t}.{m}" for t, ms in self.scores.items() for m, v in ms.items() if not math.isfinite(v)]
        return bad or ([] if math.isfinite(self.objective) else ["objective"])


def alone(model: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Recipe:
    """`model`'s own weights as a recipe over `inputs` (every input model, the base included): linear, weight 1 on
    it and 0 on the others, which merges to exactly its tensors."""
    key = input_key(model)
    entries = [ModelEntry(model=str(m), parameters={"weight": float(input_key(m) == key)}) for m in inputs]
    if not any(e.parameters["weight"] for e in entries):
        raise ValueError(f"{model} is not among the inputs {list(map(str, inputs))}")
    return Recipe(merge_method="linear", models=entries)


def is_candidate_failure(exc: BaseException) -> bool:
    """Whether `exc` fails the candidate (its trial FAILs with the reason, the search goes on) rather than the
    search: the user's errors (EvomergeError: a bad recipe point, NaN/Inf weights, an exception raised in
    their task code) and running out of device memory. Anything else is a bug in evomerge."""
    import torch

    return isinstance(exc, (EvomergeError, torch.cuda.OutOfMemoryError))


class Evaluator:
    """Inputs loaded once into one resident model on `device`, and one Scorer per named task set.

    `task_sets` maps a name ("search", "validation", "heldout", ...) to its task specs; every Scorer is built
    here, so a bad task fails before the first candidate. Not thread-safe (one evaluator per process).
    """

    def __init__(
        self,
        models: Sequence[str | os.PathLike],
        base_model: str | os.PathLike | None,
        task_sets: Mapping[str, Sequence[TaskSpec | str]],
        include_paths: Sequence[str | os.PathLike] = (),
        *,
        seed: int = 0,
        dtype: str | None = None,
        device: str | Sequence[str] = "cpu",
        batch_size: int | str | None = 64,
        include_defaults: bool = False,
        allow_config_mismatch: bool = False,
        tokenizer_source: str | None = None,
    ):
        """`device`: one device or a worker's GPU group (the model split over them); `batch_size`: lm-eval's batch,
        "auto" (lm-eval's search), or None: 64 here, and a search's worker sizes it to its device
        (`capacity.memory.device_batch`, the capacity layer sitting above this one)."""
        from evomerge.merge.materialize import Materializer

        if not task_sets:
            raise TaskError("no task set to score on; name at least one")
        # tasks first: a typo in a task name fails in seconds, before the inputs are mapped and the model built
        self.scorers: dict[str, Scorer] = {
            name: Scorer(
                specs,
                [str(p) for p in include_paths],
                seed=seed,
                batch_size=batch_size if batch_size is not None else 64,
                include_defaults=include_defaults,
            )
            for name, specs in task_sets.items()
        }
        self._orders: dict[tuple[str, int], dict[str, list[int]]] = {}  # staged evaluation's example orders
        self.materializer: Materializer = Materializer(
            [str(m) for m in models],
            None if base_model is None else str(base_model),
            dtype=dtype,
            device=device,
            allow_config_mismatch=allow_config_mismatch,
            tokenizer_source=tokenizer_source,
        )

    @classmethod
    def for_config(
        cls,
        cfg: SearchConfig,
        task_sets: Mapping[str, Sequence[TaskSpec]],
        device: str | Sequence[str] = "cpu",
    ) -> Evaluator:
        """The config's inputs, dtype, task folders, subset seed and evaluation batch (`workers.batch_size`), with
        the given task sets."""
        return cls(
            cfg.models,
            cfg.base_model,
            task_sets,
            cfg.tasks.include_paths,
            seed=cfg.seed,
            dtype=cfg.dtype,
            device=device,
            batch_size=cfg.workers.batch_size,
            include_defaults=cfg.tasks.include_defaults,
            allow_config_mismatch=cfg.allow_config_mismatch,
            tokenizer_source=cfg.tokenizer_source,
        )

    # -- the resident model ----------------------------------------------------------------------
    @property
    def model(self):
        return self.materializer.model

    @property
    def tokenizer(self):
        return self.materializer.tokenizer

    @property
    def inputs(self) -> list[str]:
        """Every input model folder (resolved), the base last: what a recipe evaluated here merges."""
        return list(self.materializer.inputs)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The memory-mapped inputs, in `inputs` order."""
        return self.materializer.checkpoints

    def load(self, recipe: Recipe | str) -> float:
        """Materialize `recipe` (a Recipe or its YAML) into the resident model; returns the seconds it took."""
        start = time.perf_counter()
        if isinstance(recipe, str):
            recipe = Recipe.from_yaml(recipe, source="candidate recipe")
        self.materializer.apply(recipe)
        return time.perf_counter() - start

    def load_model(self, model: str | os.PathLike) -> float:
        """One input model's own weights (`alone`) into the resident model."""
        return self.load(alone(model, self.inputs))

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """An arbitrary state into the resident model (e.g. the probe's controls): every named tensor is copied in.

        Names must be the model's; tensors not named keep their values, so pass a complete state unless the
        rest is meant to stay."""
        import torch

        targets = self.materializer.targets
        unknown = [n for n in tensors if n not in targets]
        if unknown:
            raise KeyError(f"tensor {unknown[0]!r} is not in {type(self.model).__name__}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                targets[name].copy_(tensor)

    # -- scoring ---------------------------------------------------------------------------------
    def scorer(self, task_set: str) -> Scorer:
        try:
            return self.scorers[task_set]
        except KeyError:
            raise KeyError(f"no task set {task_set!r}; this evaluator has {', '.join(self.scorers)}") from None

    def score(self, task_set: str, examples: bool = False) -> Evaluation:
        """The resident model's current weights on `task_set`; `examples`: also each task's per-example values
        (`Evaluation.examples`), for paired comparisons of two models on the same examples."""
        scorer = self.scorer(task_set)
        start = time.perf_counter()
        if examples:
            scores, per_example, _ = scorer.score_examples(self.model, self.tokenizer)
        else:
            scores, per_example = scorer.score(self.model, self.tokenizer), {}
        metrics = {leaf: spec.metric for spec in scorer.specs for leaf in scorer.members[spec.name]}
        return Evaluation(
            task_set=task_set,
            scores=scores,
            metrics=metrics,
            units=scorer.leaf_values(scores),
            objective=float(scorer.objective(scores)),
            eval_s=time.perf_counter() - start,
            examples=per_example,
        )

    def evaluate(self, recipe: Recipe | str, task_set: str, examples: bool = False) -> Evaluation:
        """Materialize `recipe` and score it on `task_set` (`examples`: as in `score`)."""
        merge_s = self.load(recipe)
        return replace(self.score(task_set, examples), merge_s=merge_s)

    def evaluate_examples(
        self,
        recipe: Recipe | str,
        task_set: str,
        *,
        smooth: float = 0.0,
        stages: Sequence[float] = (),
        incumbent: Mapping[str, Mapping[int, float]] | None = None,
        incumbent_objective: float | None = None,
        z: float = 2.0,
        seed: int = 0,
    ) -> Evaluation:
        """Materialize `recipe` and score it per example (scoring/staged.py): the objective mixes in the answer's
        probability (`smooth`), and with an `incumbent` a clearly worse candidate stops after a stage."""
        from evomerge.scoring.staged import run_staged, stage_order

        merge_s = self.load(recipe)
        scorer = self.scorer(task_set)
        key = (task_set, seed)
        if key not in self._orders:
            self._orders[key] = stage_order(scorer, seed)
        start = time.perf_counter()
        staged = run_staged(
            scorer,
            self.model,
            self.tokenizer,
            self._orders[key],
            stages=stages,
            incumbent=incumbent,
            incumbent_objective=incumbent_objective,
            z=z,
            smooth=smooth,
        )
        metrics = {leaf: spec.metric for spec in scorer.specs for leaf in scorer.members[spec.name]}
        units = {leaf: sum(u.values()) / len(u) for leaf, u in staged.units.items() if u}
        return Evaluation(
            task_set=task_set,
            scores=staged.scores,
            metrics=metrics,
            units=units,
            objective=staged.objective,
            merge_s=merge_s,
            eval_s=time.perf_counter() - start,
            examples={} if staged.stopped else staged.units,
            n_examples=staged.n_examples,
            stopped=staged.stopped,
        )


__all__ = ["Evaluation", "Evaluator", "alone", "is_candidate_failure"]
