"""The study of a search, kept: created or resumed (its config checked, its baselines enqueued), the portfolio's
trials added, trials asked, failed and requeued, and a dead driver's trials recovered.

    study = open_study(cfg, space)                        # resume, or create and enqueue the baselines
    trial = ask(study, distributions(space, cfg.models))  # stamped with this driver
    requeue(study, trial, "worker died: ...")             # FAIL with the reason, its params enqueued again (once)

The Optuna layer is split by concern, as Optuna splits its own: `study.storage` (URL -> storage, schema creation,
studies by name; `study.lock` holds a study for one driver), `study.samplers` (samplers by name, warm start),
`study.record` (what a trial stores) and `study.trials` (queries and the one ranking). Each name is imported from
the module that defines it; this one re-exports nothing. Only Optuna's public API
is used: attributes are set on the trial (`Trial.set_user_attr`, or the storage's `set_trial_user_attr` for a
trial this process holds no live handle on) and trials finish through `study.tell(trial, state=...)`.

Stale trials: Optuna's own machinery (`RDBStorage(heartbeat_interval=..., failed_trial_callback=...)` and
`optuna.storages.fail_stale_trials`) is not used. It waits a grace period before it fails a trial, where the study
lock lets a resumed driver fail every other driver's RUNNING trial at once (and a dead driver on this host is
known dead from its pid); it retries through `RetryFailedTrialCallback`, which records retries in system
attributes the release's studies do not have, not the `retry_of` / `worker_deaths` / baseline label a retry here
carries; and it exists for RDB storages only. So each trial carries its driver and a heartbeat (`status` reads
them without the lock), and `fail_stale_trials` recovers them.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.candidate.baseline import BaselineLabel
from evomerge.errors import StudyError
from evomerge.study.lock import GRACE_S, driver_alive, driver_id
from evomerge.study.record import (
    StudyRecord,
    TrialRecord,
    trial_attrs,
    write_study,
    write_trial,
    write_trial_by_id,
)
from evomerge.study.samplers import distributions, sampler_for
from evomerge.study.storage import Direction, create_study, delete_study, get_storage, load_study, storage_of
from evomerge.study.storage import trial_id as _trial_id
from evomerge.study.trials import (
    params_of,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    import optuna

    from evomerge.candidate.space import SearchSpace
    from evomerge.config.schema import SearchConfig
    from evomerge.study.record import AnyTrial


def directions(cfg: SearchConfig) -> list[Direction]:
    return ["maximize"] * (len(cfg.tasks.search) if cfg.multi_objective else 1)


def open_run(run_dir: Path | str) -> tuple[SearchConfig, optuna.Study]:
    """(config, study) of a run directory made by `evomerge search`, or an error saying what to run first."""
    from evomerge.config.schema import load_run_config

    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    if study is None:
        raise StudyError(f"{run_dir}: study {cfg.name!r} is not in {cfg.storage_url}; run `evomerge search` first")
    return cfg, study


def open_study(cfg: SearchConfig, space: SearchSpace, *, force: bool = False, log=print) -> optuna.Study:
    """Resume the config's study, or create it and enqueue the baselines. Refuses a changed config."""
    import optuna

    from evomerge.config.schema import diff_fields

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines under the progress bar
    storage = get_storage(cfg.storage_url)  # one engine for the whole run: loading, deleting, creating
    sampler = sampler_for(cfg, space)  # defaults sized to the space; warm start
    study = load_study(cfg.name, storage, sampler)
    record = StudyRecord.from_study(study) if study is not None else StudyRecord()
    if study is not None and record.config_hash is not None and record.config_hash != cfg.study_hash():
        changed = diff_fields(record.config or {}, cfg.study_fields()) or ["(unrecorded)"]
        if not force:
            raise StudyError(
                f"study {cfg.name!r} in {cfg.storage_url} was created with a different config "
                f"({', '.join(changed[:6])} differ); rename `name`, or pass --force to delete it and start afresh"
            )
        if log:
            log(f"--force: deleting study {cfg.name!r} ({', '.join(changed[:6])} changed)")
        delete_study(cfg.name, storage)
        study = None
    if study is None:
        study = create_study(cfg.name, storage, sampler, directions(cfg))
    if not StudyRecord.from_study(study).baselines_enqueued:
        _set_up(study, cfg, space)
    return study


def _set_up(study: optuna.Study, cfg: SearchConfig, space: SearchSpace) -> None:
    """Record the config and enqueue the baselines; idempotent, so a driver killed halfway through creating
    the study leaves one that the next run finishes setting up (no hash yet means nothing was asked yet)."""
    if StudyRecord.from_study(study).config_hash is None:
        # config_hash last: its presence says the other two were written
        write_study(study, config=cfg.study_fields(), task_names=[t.name for t in cfg.tasks.search])
        write_study(study, config_hash=cfg.study_hash())
    have = _baselines(study)
    for label, params in space.baselines(cfg.models):
        if label not in have:
            study.enqueue_trial(params, user_attrs=trial_attrs(baseline=label))
    write_study(study, baselines_enqueued=True)


def _baselines(study: optuna.Study) -> set[BaselineLabel]:
    """The baseline labels the study's trials carry (enqueued, running or done)."""
    return {r.baseline for r in map(TrialRecord.from_trial, study.get_trials(deepcopy=False)) if r.baseline}


def missing_portfolio(study: optuna.Study, labels: list[str]) -> list[str]:
    """The portfolio labels ("ties (defaults)", ...) that have no trial in the study yet."""
    have = _baselines(study)
    return [label for label in labels if label not in have]


def add_portfolio_trial(
    study: optuna.Study,
    space: SearchSpace,
    models: list,
    label: BaselineLabel,
    values: float | list[float],
    record: TrialRecord,
) -> None:
    """Record another method's default merge, scored on the search subsets, as a COMPLETE trial.

    It is added, not asked: the sampler never proposed it, so CMA-ES (which only learns from the trials of its own
    generations) ignores it, while the overfitting guard, status and export treat it like any baseline. Its
    params are the space's defaults (a trial needs the study's distributions); its recipe is the one scored.
    TPE and GP see its value at the defaults point, a mild distortion of their model of the space."""
    import optuna

    trial = optuna.trial.create_trial(
        params=space.defaults(models),
        distributions=distributions(space, models),
        user_attrs=record.model_copy(update={"baseline": label, "portfolio": True}).to_attrs(),
        **({"values": values} if isinstance(values, list) else {"value": values}),
    )
    study.add_trial(trial)


# -- trial bookkeeping ------------------------------------------------------------------------------


def ask(study: optuna.Study, distributions: dict) -> optuna.trial.Trial:
    """A new trial (an enqueued one first), stamped with this driver so a dead driver's trials can be found."""
    trial = study.ask(distributions)
    write_trial(trial, driver=driver_id(), heartbeat=time.time())
    return trial


def heartbeat(trials: Iterable[optuna.trial.Trial]) -> None:
    now = time.time()
    for trial in trials:
        write_trial(trial, heartbeat=now)


def fail(study: optuna.Study, trial: AnyTrial, reason: str, record: TrialRecord | None = None) -> None:
    """Mark a trial FAIL with a `fail_reason` (and what else `record` sets) — never silently. `trial`: this
    driver's live Trial, or a FrozenTrial (a dead driver's, read back from the storage)."""
    import optuna

    if isinstance(trial, optuna.trial.Trial):
        write_trial(trial, record, fail_reason=reason)
    else:
        storage = storage_of(study)
        write_trial_by_id(storage, _trial_id(study, trial.number), record, fail_reason=reason)
    try:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, RuntimeError):  # finished meanwhile by another driver
        pass


def requeue(
    study: optuna.Study, trial: AnyTrial, reason: str, record: TrialRecord | None = None, worker_deaths: int = 0
) -> None:
    """FAIL a trial that did not finish through no fault of its params, and enqueue them again (once).

    Crash-safe in this order: the retry is enqueued first, unless one exists already, then the trial
    fails; a driver killed in between finds the trial RUNNING again and only fails it. The retry
    carries `retry_of`, the baseline label, and how many workers died on these params.
    """
    number = trial.number
    if not any(TrialRecord.from_trial(t).retry_of == number for t in study.get_trials(deepcopy=False)):
        label = TrialRecord.from_trial(trial).baseline
        retry = trial_attrs(retry_of=number, baseline=label, worker_deaths=worker_deaths)
        study.enqueue_trial(params_of(trial), user_attrs=retry)
    fail(study, trial, reason, record)


def stale_reason(trial: optuna.trial.FrozenTrial, now: float | None = None, exclusive: bool = False) -> str | None:
    """Why a RUNNING trial is abandoned, or None. `exclusive`: this driver holds the study's lock, so every
    RUNNING trial of another driver process is abandoned."""
    record = TrialRecord.from_trial(trial)
    driver = record.driver
    now = time.time() if now is None else now
    if driver and driver.get("host") == socket.gethostname():
        if driver.get("pid") != driver_id()["pid"] and not driver_alive(driver):
            return f"driver process {driver.get('pid')} on {driver.get('host')} died while the trial ran"
        return None
    beat = record.heartbeat
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - beat > GRACE_S:
        return f"no heartbeat from its driver for {now - beat:.0f} s"
    if exclusive:  # e.g. killed between asking the trial and stamping it with its driver
        who = f"driver process {driver.get('pid')} on {driver.get('host')}" if driver else "the search that asked it"
        return f"{who} stopped before the trial finished; this driver holds the study now"
    return None


def fail_stale_trials(study: optuna.Study, log=print, exclusive: bool = False) -> list[int]:
    """RUNNING trials of dead drivers -> FAIL (reason in `fail_reason`), their params enqueued again.

    `exclusive`: the caller holds the study's lock (`StudyLock`), so no other driver is running it.
    """
    import optuna

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        reason = stale_reason(trial, exclusive=exclusive)
        if reason is None:
            continue
        requeue(study, trial, f"stale: {reason}", worker_deaths=TrialRecord.from_trial(trial).worker_deaths)
        failed.append(trial.number)
    if failed and log:
        log(f"trials {', '.join(map(str, failed))} were left RUNNING by a dead process: failed and enqueued again")
    return failed
