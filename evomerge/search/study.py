"""All Optuna state handling: storage, create or resume a study, ask/tell bookkeeping, stale trials.

The study storage is the single source of truth: config hash, trials, their scores and timings (user
attrs), and the sampler's own state (CMA-ES pickles its optimizer into trial system attrs), so a
re-run of `evomerge search CONFIG` continues exactly where the last one stopped.
"""
from __future__ import annotations

import functools
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import StudyError

if TYPE_CHECKING:
    import optuna

    from evomerge.search.config import SearchConfig
    from evomerge.search.space import SearchSpace

HEARTBEAT_S = 60.0  # how often a driver stamps its in-flight trials
GRACE_S = 600.0  # a RUNNING trial of another host with no heartbeat for this long is stale
SQLITE_TIMEOUT_S = 60  # concurrent writers wait for the lock instead of failing


def _sqlite_connect(path: str):
    """A sqlite connection that waits for locks, in WAL mode: one commit per trial attribute costs ~1 ms, not an fsync."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process; only a power cut may lose the last commit
    return conn


def get_storage(storage: Any = None):
    """None -> in-memory; an RDB URL -> RDBStorage (sqlite waits on locks); a storage object -> itself."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite:///"):
        db = Path(storage.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"creator": functools.partial(_sqlite_connect, str(db))}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(storage, **kwargs)
        except Exception as err:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            if "already exists" in str(err) and attempt < 2:  # another process is creating the tables right now
                time.sleep(0.5)
                continue
            first = str(err).splitlines()[0]
            raise StudyError(f"storage {storage!r} cannot be opened ({type(err).__name__}: {first}); fix `storage` or --storage") from None


def directions(cfg: SearchConfig) -> list[str]:
    return ["maximize"] * (len(cfg.tasks.search) if cfg.multi_objective else 1)


def load_study(name: str, storage: Any, sampler=None) -> optuna.Study | None:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=get_storage(storage), sampler=sampler)
    except KeyError:
        return None


def open_study(cfg: SearchConfig, space: SearchSpace, *, force: bool = False, log=print) -> optuna.Study:
    """Resume the config's study, or create it and enqueue the baselines. Refuses a changed config."""
    import optuna

    from evomerge.search.config import diff_fields
    from evomerge.search.samplers import sampler_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines under the progress bar
    storage = get_storage(cfg.storage_url)
    sampler = sampler_for(cfg, space)  # defaults sized to the space; warm start
    study = load_study(cfg.name, storage, sampler)
    recorded = study.user_attrs.get("config_hash") if study is not None else None
    if study is not None and recorded is not None and recorded != cfg.study_hash():
        changed = diff_fields(study.user_attrs.get("config", {}), cfg.study_fields()) or ["(unrecorded)"]
        if not force:
            raise StudyError(
                f"study {cfg.name!r} in {cfg.storage_url} was created with a different config "
                f"({', '.join(changed[:6])} differ); rename `name`, or pass --force to delete it and start afresh"
            )
        (log or _quiet)(f"--force: deleting study {cfg.name!r} ({', '.join(changed[:6])} changed)")
        optuna.delete_study(study_name=cfg.name, storage=storage)
        study = None
    if study is None:
        study = optuna.create_study(
            study_name=cfg.name, storage=storage, sampler=sampler, directions=directions(cfg), load_if_exists=True
        )
    if not study.user_attrs.get("baselines_enqueued"):
        _set_up(study, cfg, space)
    return study


def _set_up(study: optuna.Study, cfg: SearchConfig, space: SearchSpace) -> None:
    """Record the config and enqueue the baselines; idempotent, so a driver killed halfway through creating
    the study leaves one that the next run finishes setting up (no hash yet means nothing was asked yet)."""
    if study.user_attrs.get("config_hash") is None:
        study.set_user_attr("config", cfg.study_fields())
        study.set_user_attr("task_names", [t.name for t in cfg.tasks.search])
        study.set_user_attr("config_hash", cfg.study_hash())
    have = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    for label, params in space.baselines(cfg.models):
        if label not in have:
            study.enqueue_trial(params, user_attrs={"baseline": label})
    study.set_user_attr("baselines_enqueued", True)


# -- trial bookkeeping ------------------------------------------------------------------------------

def _quiet(_msg: str) -> None:
    pass


def ask(study: optuna.Study, distributions: dict) -> optuna.trial.Trial:
    """A new trial (an enqueued one first), stamped with this driver so a dead driver's trials can be found."""
    from evomerge.search.lock import driver_id

    trial = study.ask(distributions)
    trial.set_user_attr("driver", driver_id())
    trial.set_user_attr("heartbeat", time.time())
    return trial


def heartbeat(trials) -> None:
    now = time.time()
    for trial in trials:
        trial.set_user_attr("heartbeat", now)


def fail(study: optuna.Study, trial_id: int, number: int, reason: str, attrs: dict | None = None) -> None:
    """Mark a trial FAIL with a `fail_reason` (and any other attrs) — never silently."""
    import optuna

    storage = study._storage
    for key, value in {**(attrs or {}), "fail_reason": reason}.items():
        storage.set_trial_user_attr(trial_id, key, value)
    try:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, RuntimeError):  # finished meanwhile by another driver
        pass


def params_of(trial) -> dict[str, Any]:
    """A trial's params, also those it was enqueued with but had not recorded yet (killed inside `ask`)."""
    frozen = getattr(trial, "_cached_frozen_trial", trial)  # optuna.Trial or FrozenTrial
    return {**frozen.system_attrs.get("fixed_params", {}), **trial.params}


def requeue(study: optuna.Study, trial, reason: str, attrs: dict | None = None, worker_deaths: int = 0) -> None:
    """FAIL a trial that did not finish through no fault of its params, and enqueue them again (once).

    Crash-safe in this order: the retry is enqueued first, unless one exists already, then the trial
    fails; a driver killed in between finds the trial RUNNING again and only fails it. The retry
    carries `retry_of`, the baseline label, and how many workers died on these params.
    """
    number = trial.number
    if not any(t.user_attrs.get("retry_of") == number for t in study.get_trials(deepcopy=False)):
        extra = {k: trial.user_attrs[k] for k in ("baseline",) if k in trial.user_attrs}
        if worker_deaths:
            extra["worker_deaths"] = worker_deaths
        study.enqueue_trial(params_of(trial), user_attrs={"retry_of": number, **extra})
    fail(study, trial._trial_id, number, reason, attrs)


def stale_reason(trial, now: float | None = None, exclusive: bool = False) -> str | None:
    """Why a RUNNING trial is abandoned, or None. `exclusive`: this driver holds the study's lock, so every
    RUNNING trial of another driver process is abandoned."""
    from evomerge.search.lock import driver_id, pid_alive

    driver = trial.user_attrs.get("driver")
    now = time.time() if now is None else now
    if driver and driver.get("host") == socket.gethostname():
        if driver.get("pid") != driver_id()["pid"] and not pid_alive(driver):
            return f"driver process {driver.get('pid')} on {driver.get('host')} died while the trial ran"
        return None
    beat = trial.user_attrs.get("heartbeat")
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - beat > GRACE_S:
        return f"no heartbeat from its driver for {now - beat:.0f} s"
    if exclusive:  # e.g. killed between asking the trial and stamping it with its driver
        who = f"{driver.get('pid')} on {driver.get('host')}" if driver else "(unrecorded)"
        return f"driver process {who} stopped before the trial finished; this driver holds the study now"
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
        requeue(study, trial, f"stale: {reason}", worker_deaths=int(trial.user_attrs.get("worker_deaths", 0)))
        failed.append(trial.number)
    if failed:
        (log or _quiet)(f"trials {', '.join(map(str, failed))} were left RUNNING by a dead process: failed and enqueued again")
    return failed


def complete_trials(study: optuna.Study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def objective_of(trial) -> float:
    """A completed trial's weighted-mean score (also for multi-objective studies)."""
    value = trial.user_attrs.get("objective")
    if value is None:
        value = trial.values[0] if trial.values else float("nan")
    return float(value)


def best_trial(study: optuna.Study):
    """The best COMPLETE trial (by weighted mean for multi-objective studies), or None."""
    done = complete_trials(study)
    if not done:
        return None
    return max(done, key=lambda t: (objective_of(t), -t.number))


def pareto_front(study: optuna.Study) -> list:
    if len(study.directions) == 1:
        best = best_trial(study)
        return [best] if best else []
    return sorted(study.best_trials, key=lambda t: t.number)


__all__ = [
    "get_storage",
    "open_study",
    "load_study",
    "ask",
    "fail",
    "fail_stale_trials",
    "requeue",
    "heartbeat",
    "best_trial",
    "pareto_front",
    "complete_trials",
    "objective_of",
]
