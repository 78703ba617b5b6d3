"""What a study stores, typed: one trial's record (its Optuna user attributes) and the study's own attributes.

    record = TrialRecord.from_trial(trial)          # any Optuna trial: FrozenTrial or a live Trial
    record.scores, record.baseline, record.whole    # typed fields, never `trial.user_attrs["..."]`
    for key, value in TrialRecord(recipe=text).to_attrs().items(): trial.set_user_attr(key, value)
    StudyRecord.from_study(study).config_hash

This module is the only place that names a user-attribute key (tests/test_trial_record.py greps the package). The
keys and their values on disk are those evomerge has always written, so a study made before this module existed
reads back identically and resumes: a field is stored only when it differs from its default (`to_attrs` of a
partial record writes just the fields set, as the driver does step by step), `examples` keeps its JSON form
(string keys on disk, ints here), and a baseline label is the string it always was (`evomerge.candidate.baseline`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

from pydantic import BaseModel, ConfigDict

from evomerge.candidate.baseline import BaselineLabel
from evomerge.scoring.scorer import Examples, Scores

if TYPE_CHECKING:
    import optuna

    # Optuna's types under the names the modules outside the Optuna layer annotate with (only this layer imports
    # Optuna): a study, a trial as this driver holds it (asked, live), as the storage hands it back (frozen), either.
    Study: TypeAlias = optuna.Study
    LiveTrial: TypeAlias = optuna.trial.Trial
    FrozenTrial: TypeAlias = optuna.trial.FrozenTrial
    AnyTrial: TypeAlias = optuna.trial.Trial | optuna.trial.FrozenTrial


class TrialRecord(BaseModel):
    """A trial's user attributes. Written in steps (the driver stamps a trial when it asks it, adds the recipe,
    then the results), so every field is optional and `to_attrs` carries only what a record sets."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # -- what it scored -----------------------------------------------------------------------------------
    scores: Scores | None = None  # every metric lm-eval reported, per search task
    objective: float | None = None  # the tasks' weighted mean (also for multi-objective studies)
    examples: Examples | None = None  # per leaf task, per example index: the objective's units
    examples_scored: int | None = None  # per-example scoring: how many examples it took
    stopped_early: bool = False  # staged evaluation stopped it: `objective` is an estimate that only ranks it
    # -- what it cost (seconds) and where -----------------------------------------------------------------
    merge_s: float | None = None
    eval_s: float | None = None
    total_s: float | None = None  # the worker's cycle: idle for the driver + parse, merge, evaluation
    latency_s: float | None = None  # ask to tell, queueing included
    worker: str | None = None  # "host:pid" of the worker that scored it
    recipe: str | None = None  # the recipe YAML that was scored (what export writes)
    # -- where it came from ---------------------------------------------------------------------------------
    baseline: BaselineLabel | None = None  # an enqueued (or added) baseline's label; None: sampled or refined
    portfolio: bool = False  # another method's default merge, added COMPLETE: not in the budget, not the sampler's
    refine_round: int | None = None  # a point of gradient refinement round N ...
    refine_arm: str | None = None  # ... of this kind (refine.arms: tensor, rows, distill) ...
    refine_step: int | None = None  # ... after this many Adam steps ...
    refined_from: int | None = None  # ... started from this trial ...
    surrogate_loss: float | None = None  # ... where the surrogate's loss was this
    coefficients: dict[str, str] | None = None  # {file, sha256}: its per-row coefficients (refine/rows.py)
    retry_of: int | None = None  # the same params again: that trial did not finish through no fault of its own
    worker_deaths: int = 0  # workers that died while these params were running
    # -- liveness and failure ----------------------------------------------------------------------------
    driver: dict[str, Any] | None = None  # {host, pid, start} of the driver that asked it
    heartbeat: float | None = None  # when that driver last stamped it (time.time)
    fail_reason: str | None = None

    @classmethod
    def from_trial(cls, trial: Any) -> TrialRecord:
        return cls.model_validate(trial.user_attrs)

    def to_attrs(self) -> dict[str, Any]:
        """{user-attr key: JSON value} of every field this record sets (defaults are never written)."""
        attrs = self.model_dump(exclude_defaults=True)
        if "examples" in attrs:  # JSON object keys are strings: stored as the release always stored them
            attrs["examples"] = {leaf: {str(i): v for i, v in u.items()} for leaf, u in attrs["examples"].items()}
        return attrs

    @property
    def whole(self) -> bool:
        """Scored on its whole search subsets (not stopped early): its value may be a best trial or a finalist."""
        return not self.stopped_early

    @property
    def enqueued(self) -> bool:
        """A baseline, a refinement point or a retry: scored whole, never stopped early against the incumbent."""
        return self.baseline is not None or self.refine_round is not None or self.retry_of is not None

    @property
    def alone(self) -> str | None:
        """The model (its key) this baseline is alone ("only add"), else None."""
        return self.baseline.model if self.baseline is not None else None

    def task_values(self, tasks: Any) -> dict[str, float]:
        """{task: its metric's value} for the task specs this trial has scores of."""
        scores = self.scores or {}
        return {t.name: scores[t.name][t.metric] for t in tasks if t.metric in scores.get(t.name, {})}

    def task_value(self, task: Any, default: float | None = None) -> float | None:
        """One task spec's metric value, or `default` if this trial has none."""
        return (self.scores or {}).get(task.name, {}).get(task.metric, default)


def trial_attrs(**fields: Any) -> dict[str, Any]:
    """The user attributes of a record with these fields (validated): `enqueue_trial(params, user_attrs=...)`."""
    return TrialRecord(**fields).to_attrs()


def write_trial(trial: Any, record: TrialRecord | None = None, **fields: Any) -> None:
    """Set `record`'s fields and these (validated) as the live trial's user attributes."""
    for key, value in _merged(record, fields).items():
        trial.set_user_attr(key, value)


def write_trial_by_id(storage: Any, trial_id: int, record: TrialRecord | None = None, **fields: Any) -> None:
    """The same through the trial's storage (a trial this process holds no live handle on)."""
    for key, value in _merged(record, fields).items():
        storage.set_trial_user_attr(trial_id, key, value)


def _merged(record: TrialRecord | None, fields: dict[str, Any]) -> dict[str, Any]:
    base = record.to_attrs() if record is not None else {}
    return TrialRecord.model_validate({**base, **fields}).to_attrs() if fields else base


# -- the study's own attributes ----------------------------------------------------------------------------

_VALIDATION = "validation:"  # + trial number: the overfitting guard's result for that trial


class StudyRecord(BaseModel):
    """A study's user attributes: the config it was created with, the set-up flag, the lock's holder, and the
    overfitting guard's results per trial (`validation:<trial>`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    config: dict[str, Any] | None = None  # the study fields of the config (`SearchConfig.study_fields`)
    config_hash: str | None = None  # their hash: a resume with another config is refused
    task_names: list[str] | None = None  # the search tasks, in config order
    baselines_enqueued: bool = False  # set up: config recorded and baselines enqueued
    lock: dict[str, Any] | None = None  # the driver holding the study (study/lock.py), None when released
    validation: dict[int, dict[str, Any]] = {}  # trial -> its guard result (`validate.guard.Validation` as JSON)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StudyRecord:
        fields = {k: v for k, v in attrs.items() if not k.startswith(_VALIDATION)}
        results = {
            int(k[len(_VALIDATION) :]): v
            for k, v in attrs.items()
            if k.startswith(_VALIDATION) and k[len(_VALIDATION) :].isdigit() and isinstance(v, dict)
        }
        return cls.model_validate({**fields, "validation": results})

    @classmethod
    def from_study(cls, study: Any) -> StudyRecord:
        return cls.from_attrs(study.user_attrs)


_STUDY_FIELDS = frozenset(StudyRecord.model_fields) - {"validation"}


def write_study(study: Any, **fields: Any) -> None:
    """Set these study attributes (None included: a released lock is written as None)."""
    unknown = set(fields) - _STUDY_FIELDS
    if unknown:
        raise TypeError(f"no study attribute {', '.join(sorted(unknown))}")
    StudyRecord.model_validate(fields)  # typed like the record
    for key, value in fields.items():
        study.set_user_attr(key, value)


def write_validation(study: Any, trial: int, value: dict[str, Any]) -> None:
    """Record the overfitting guard's result for `trial`."""
    study.set_user_attr(f"{_VALIDATION}{int(trial)}", value)


__all__ = [
    "BaselineLabel",
    "StudyRecord",
    "TrialRecord",
    "trial_attrs",
    "write_study",
    "write_trial",
    "write_trial_by_id",
    "write_validation",
]
