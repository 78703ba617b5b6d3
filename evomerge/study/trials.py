"""A study's trials, read: by state, the budget's count, the objective, the one ranking, the best trial, the front.

    ranked(complete_trials(study))[:3]      # the top trials: whole ones, best objective first, then lower number
    best_trial(study)                       # ranked(...)[0], or None
    trial_by_number(study, 7)               # COMPLETE trial 7, or a StudyError saying what it is

"Top trials" has one definition, `ranked`, used by the overfitting guard (its finalists), status, the report and
export: COMPLETE trials scored on their whole search subsets (staged evaluation may stop one early; its value is
an estimate that only ranks it), by weighted-mean objective, ties to the earlier trial. What a trial recorded
is read through its record (`study.record`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from evomerge.errors import StudyError
from evomerge.study.record import TrialRecord

if TYPE_CHECKING:
    import optuna

    from evomerge.study.record import AnyTrial


def complete_trials(study: optuna.Study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def by_state(study: optuna.Study) -> dict[str, list]:
    """{state name (COMPLETE, FAIL, RUNNING, WAITING, ...): its trials in number order}."""
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.state.name, []).append(t)
    return out


def budget_count(study: optuna.Study) -> int:
    """COMPLETE trials that count against `budget.n_trials`: every one but the portfolio's default merges of other
    methods, which are references the search is measured against, not trials of its own space."""
    return sum(1 for t in complete_trials(study) if not TrialRecord.from_trial(t).portfolio)


def objective_of(trial: optuna.trial.FrozenTrial) -> float:
    """A completed trial's weighted-mean score (also for multi-objective studies, whose values are per task)."""
    value = TrialRecord.from_trial(trial).objective
    if value is None:
        value = trial.values[0] if trial.values else float("nan")
    return float(value)


def is_whole(trial: AnyTrial) -> bool:
    """Whether a COMPLETE trial was scored on its whole search subsets (staged evaluation may stop one early;
    its value is then an estimate that only ranks it, and it is never the best trial or a guard finalist)."""
    return TrialRecord.from_trial(trial).whole


def ranked(trials: Iterable[Any], *, own: bool = False) -> list:
    """THE ranking of trials: the whole ones (`is_whole`), best weighted-mean objective first, ties to the
    earlier trial. `own`: leave out the portfolio's default merges of other methods (whose params are a
    placeholder), e.g. for a point to continue from."""
    keep = [t for t in trials if is_whole(t) and not (own and TrialRecord.from_trial(t).portfolio)]
    return sorted(keep, key=lambda t: (-objective_of(t), t.number))


def best_trial(study: optuna.Study, *, own: bool = False) -> optuna.trial.FrozenTrial | None:
    """The first of `ranked` COMPLETE trials, or None."""
    top = ranked(complete_trials(study), own=own)
    return top[0] if top else None


def pareto_front(study: optuna.Study) -> list:
    if len(study.directions) == 1:
        best = best_trial(study)
        return [best] if best else []
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_by_number(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """COMPLETE trial `number`, or a StudyError saying what it is instead."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise StudyError(
            f"study {study.study_name!r} has no trial {number} (trials 0-{len(trials) - 1}); see `evomerge status`"
        )
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        why = TrialRecord.from_trial(trial).fail_reason or ""
        raise StudyError(f"trial {number} is {trial.state.name}{f' ({why})' if why else ''}; pick a COMPLETE trial")
    return trial


def params_of(trial: AnyTrial) -> dict[str, Any]:
    """A trial's params, also those a FrozenTrial was enqueued with but had not recorded yet (its driver was killed
    inside `ask`): Optuna keeps an enqueued trial's params in its `fixed_params` system attribute."""
    from optuna.trial import FrozenTrial

    fixed = trial.system_attrs.get("fixed_params", {}) if isinstance(trial, FrozenTrial) else {}
    return {**fixed, **trial.params}


__all__ = [
    "best_trial",
    "budget_count",
    "by_state",
    "complete_trials",
    "is_whole",
    "objective_of",
    "pareto_front",
    "params_of",
    "ranked",
    "trial_by_number",
]
