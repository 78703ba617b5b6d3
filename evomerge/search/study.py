"""The one Optuna module: storage, create or resume a study, samplers by name, warm start, ask/tell
bookkeeping, stale trials, and the study's queries (best trial, Pareto front, a trial by number).

The study storage is the single source of truth: config hash, trials, their scores and timings (user
attrs), and the sampler's own state (CMA-ES pickles its optimizer into trial system attrs), so a
re-run of `evomerge search CONFIG` continues exactly where the last one stopped. Samplers keep no state
of their own: options the config leaves out get defaults sized to the search space (`auto_options`), and
`sampler.warm_start` starts CMA-ES from an earlier study's trials on the same models and search space
(Optuna's `source_trials`, WS-CMA-ES). Optuna is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.config import SAMPLERS, check_sampler
from evomerge.errors import ConfigError, StudyError, first_line
from evomerge.search.lock import GRACE_S, HEARTBEAT_S, driver_alive, driver_id
from evomerge.search.record import (
    BaselineLabel,
    StudyRecord,
    TrialRecord,
    trial_attrs,
    write_study,
    write_trial,
    write_trial_by_id,
)
from evomerge.storage_url import engine_url, password_hint, redact

if TYPE_CHECKING:
    import optuna

    from evomerge.config import SearchConfig
    from evomerge.space import SearchSpace

SQLITE_TIMEOUT_S = 60  # concurrent writers wait for the lock instead of failing
SCHEMA_WAIT_S = 120  # how long opening a storage retries while other processes create the same schema
# messages of the errors concurrent schema creation raises (SQLite, PostgreSQL, MySQL), in lower case
_SCHEMA_RACES = (
    "already exists",
    "duplicate key",
    "duplicate entry",
    "database is locked",
    "deadlock detected",
    "could not serialize",
)
SEPARABLE_DIM = 40  # above this many searched parameters, CMA-ES adapts a diagonal covariance only


def _sqlite_connect(path: str):
    """A sqlite connection that waits for locks, in WAL mode: one commit per trial attribute costs ~1 ms, not an
    fsync."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "PRAGMA synchronous=NORMAL"
    )  # WAL + NORMAL survives a killed process; only a power cut may lose the last commit
    return conn


def get_storage(storage: Any = None):
    """None -> in-memory; an RDB URL -> RDBStorage (sqlite waits on locks); a storage object -> itself.

    A URL may be redacted (`user:***@`): `storage_url.engine_url` puts the password back, and no message shows it."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    shown = redact(storage)
    url = engine_url(storage)  # the driver is installed, or a StudyError says what to install
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"creator": functools.partial(_sqlite_connect, str(db))}
    else:  # a server may drop idle pooled connections during a long search; test them before use
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    deadline = time.monotonic() + SCHEMA_WAIT_S
    for attempt in itertools.count():
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as err:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            if schema_race(err) and time.monotonic() < deadline:
                # another process is creating the schema right now (a second driver, `evomerge status`, a
                # dashboard): its tables and version rows are there, or soon will be; open them again
                time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))
                continue
            raise StudyError(
                f"storage {shown!r} cannot be opened ({type(err).__name__}: {redact(first_line(err))})"
                f"{password_hint(storage) or '; fix `storage` or --storage'}"
            ) from None


def schema_race(err: BaseException) -> bool:
    """Whether `err` is what opening a storage raises while another process creates the same schema: Optuna's
    `create_all` (a table created twice), its version rows inserted twice (`alembic_version`, `version_info`),
    or SQLite's writer lock held past its timeout. Nothing else is retried: a bad URL fails at once."""
    from sqlalchemy.exc import IntegrityError

    if isinstance(err, IntegrityError):  # the only rows opening a storage inserts are the schema's version
        return True
    text = str(err).lower()
    return any(s in text for s in _SCHEMA_RACES)


def directions(cfg: SearchConfig) -> list[str]:
    return ["maximize"] * (len(cfg.tasks.search) if cfg.multi_objective else 1)


def open_run(run_dir: Path | str) -> tuple[SearchConfig, optuna.Study]:
    """(config, study) of a run directory made by `evomerge search`, or an error saying what to run first."""
    from evomerge.config import load_run_config

    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    if study is None:
        raise StudyError(f"{run_dir}: study {cfg.name!r} is not in {cfg.storage_url}; run `evomerge search` first")
    return cfg, study


def load_study(name: str, storage: Any, sampler=None) -> optuna.Study | None:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=get_storage(storage), sampler=sampler)
    except KeyError:
        return None


def open_study(cfg: SearchConfig, space: SearchSpace, *, force: bool = False, log=print) -> optuna.Study:
    """Resume the config's study, or create it and enqueue the baselines. Refuses a changed config."""
    import optuna

    from evomerge.config import diff_fields

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines under the progress bar
    storage = get_storage(cfg.storage_url)
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
        (log or _quiet)(f"--force: deleting study {cfg.name!r} ({', '.join(changed[:6])} changed)")
        optuna.delete_study(study_name=cfg.name, storage=storage)
        study = None
    if study is None:
        study = optuna.create_study(
            study_name=cfg.name, storage=storage, sampler=sampler, directions=directions(cfg), load_if_exists=True
        )
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

    dists = distributions(space, models)
    trial = optuna.trial.create_trial(
        params=space.defaults(models),
        distributions=dists,
        user_attrs=record.model_copy(update={"baseline": label, "portfolio": True}).to_attrs(),
        **({"values": values} if isinstance(values, list) else {"value": values}),
    )
    study.add_trial(trial)


# -- trial bookkeeping ------------------------------------------------------------------------------


def _quiet(_msg: str) -> None:
    pass


def distributions(space: SearchSpace, models: list) -> dict[str, Any]:
    """{searched number: Optuna distribution} of a search space over `models`."""
    from optuna.distributions import FloatDistribution

    return {name: FloatDistribution(ps.low, ps.high, log=ps.log) for name, ps in space.bounds(models).items()}


def ask(study: optuna.Study, distributions: dict) -> optuna.trial.Trial:
    """A new trial (an enqueued one first), stamped with this driver so a dead driver's trials can be found."""
    trial = study.ask(distributions)
    write_trial(trial, driver=driver_id(), heartbeat=time.time())
    return trial


def heartbeat(trials) -> None:
    now = time.time()
    for trial in trials:
        write_trial(trial, heartbeat=now)


def fail(study: optuna.Study, trial_id: int, number: int, reason: str, record: TrialRecord | None = None) -> None:
    """Mark a trial FAIL with a `fail_reason` (and what else `record` sets) — never silently."""
    import optuna

    write_trial_by_id(study._storage, trial_id, record, fail_reason=reason)
    try:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, RuntimeError):  # finished meanwhile by another driver
        pass


def params_of(trial) -> dict[str, Any]:
    """A trial's params, also those it was enqueued with but had not recorded yet (killed inside `ask`)."""
    frozen = getattr(trial, "_cached_frozen_trial", trial)  # optuna.Trial or FrozenTrial
    return {**frozen.system_attrs.get("fixed_params", {}), **trial.params}


def requeue(study: optuna.Study, trial, reason: str, record: TrialRecord | None = None, worker_deaths: int = 0) -> None:
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
    fail(study, trial._trial_id, number, reason, record)


def stale_reason(trial, now: float | None = None, exclusive: bool = False) -> str | None:
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
    if failed:
        (log or _quiet)(
            f"trials {', '.join(map(str, failed))} were left RUNNING by a dead process: failed and enqueued again"
        )
    return failed


def complete_trials(study: optuna.Study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def budget_count(study: optuna.Study) -> int:
    """COMPLETE trials that count against `budget.n_trials`: every one but the portfolio's default merges of other
    methods, which are references the search is measured against, not trials of its own space."""
    return sum(1 for t in complete_trials(study) if not TrialRecord.from_trial(t).portfolio)


def objective_of(trial) -> float:
    """A completed trial's weighted-mean score (also for multi-objective studies)."""
    value = TrialRecord.from_trial(trial).objective
    if value is None:
        value = trial.values[0] if trial.values else float("nan")
    return float(value)


def is_whole(trial) -> bool:
    """Whether a COMPLETE trial was scored on its whole search subsets (staged evaluation may stop one early;
    its value is then an estimate that only ranks it, and it is never the best trial or a guard finalist)."""
    return TrialRecord.from_trial(trial).whole


def best_trial(study: optuna.Study, *, own: bool = False):
    """The best COMPLETE trial scored whole (by weighted mean for multi-objective studies), or None. `own`: of
    the study's own space only, not another method's default merge from the portfolio (whose params are a
    placeholder), e.g. as a point to continue from."""
    done = [t for t in complete_trials(study) if is_whole(t) and not (own and TrialRecord.from_trial(t).portfolio)]
    if not done:
        return None
    return max(done, key=lambda t: (objective_of(t), -t.number))


def pareto_front(study: optuna.Study) -> list:
    if len(study.directions) == 1:
        best = best_trial(study)
        return [best] if best else []
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_by_number(study: optuna.Study, number: int):
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


def by_state(study: optuna.Study) -> dict[str, list]:
    """{state name (COMPLETE, FAIL, RUNNING, WAITING, ...): its trials in number order}."""
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.state.name, []).append(t)
    return out


# -- samplers ---------------------------------------------------------------------------------------


def auto_options(name: str, dim: int, options: dict[str, Any], warm_start: bool = False) -> dict[str, Any]:
    """Defaults for the options the config leaves out, sized to a `dim`-parameter search space.

    CMA-ES: population 4 + 3 ln(dim) (Hansen's default), clipped to 6-12 so a 100-trial budget sees 8+
    generations; step size 0.25 of each parameter's range, where Optuna's 1/6 stays near the middle of the
    space in a short search (the earlier demo zoo, 100 trials: held-out 0.627 vs 0.617 for task arithmetic, 0.613
    vs 0.523 for TIES; the script that measured it is in git history before bench/search_suite.py replaced it); a
    diagonal covariance (separable CMA-ES) above SEPARABLE_DIM parameters, where a full covariance cannot be
    learned from a few hundred trials.
    """
    out: dict[str, Any] = {}
    if name == "cmaes" and dim > 0:
        out["popsize"] = min(12, max(6, 4 + int(3 * math.log(dim))))
        if not warm_start:
            out["sigma0"] = 0.25
            if dim > SEPARABLE_DIM:
                out["use_separable_cma"] = True
    return {k: v for k, v in out.items() if k not in options}


def make_sampler(
    name: str,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    *,
    dim: int = 0,
    source_trials: list | None = None,
):
    """A fresh Optuna sampler (`config.SAMPLERS` by name); resuming a study with it continues where the storage
    left off. `dim`: the number of searched parameters (sizes the defaults); `source_trials`: CMA-ES warm start."""
    import optuna

    options = dict(options or {})
    warm = source_trials is not None
    try:
        check_sampler(name, options, warm_start=warm)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    info = SAMPLERS[name]
    kwargs = {**info.defaults, **auto_options(name, dim, options, warm), **options}
    if warm:
        kwargs["source_trials"] = source_trials
    try:
        with warnings.catch_warnings():  # x0/sigma0 are deprecated (FutureWarning), warm start experimental
            warnings.simplefilter("ignore")
            return getattr(optuna.samplers, info.optuna_class)(seed=seed, **kwargs)
    except (TypeError, ValueError) as err:
        shown = {k: v for k, v in kwargs.items() if k != "source_trials"}
        raise ConfigError(f"sampler.options: {info.optuna_class} rejects {shown}: {err}") from None


def warm_start_trials(cfg: SearchConfig, space: SearchSpace) -> list:
    """The COMPLETE trials of `sampler.warm_start` over exactly this search space (same names and bounds)."""
    from evomerge.config import WarmStartConfig, load_run_config

    ref = cfg.sampler.warm_start
    if isinstance(ref, WarmStartConfig):
        name, storage, where = ref.study, ref.storage, f"study {ref.study!r} in {ref.storage}"
    else:
        try:
            source = load_run_config(Path(str(ref)))
        except ConfigError as err:
            raise ConfigError(f"sampler.warm_start: {err}") from None
        name, storage, where = source.name, source.storage_url, f"run {ref} (study {source.name!r})"
    if name == cfg.name and storage == cfg.storage_url:
        raise ConfigError(f"sampler.warm_start names this study itself ({where}); point it at an earlier study")
    study = load_study(name, storage)
    if study is None:
        raise ConfigError(f"sampler.warm_start: {where} does not exist; run that search first or fix the path")
    theirs = StudyRecord.from_study(study).config or {}
    ours = cfg.study_fields()
    same = [str(Path(p)) for p in [ours["base_model"], *ours["models"]]]
    if theirs and [str(Path(p)) for p in [theirs.get("base_model"), *theirs.get("models", [])]] != same:
        raise ConfigError(
            f"sampler.warm_start: {where} merged other models; warm-start from a study of the same models"
        )
    wanted = distributions(space, cfg.models)
    trials = [
        t
        for t in complete_trials(study)
        if t.distributions == wanted and t.values and len(t.values) == 1 and not TrialRecord.from_trial(t).portfolio
    ]
    if not trials:
        raise ConfigError(
            f"sampler.warm_start: {where} has no COMPLETE trial over this search space (same parameters and bounds); "
            "warm-start from a study with the same search space"
        )
    return trials


def sampler_for(cfg: SearchConfig, space: SearchSpace):
    """The config's sampler, its defaults sized to the space, warm-started when the config says so."""
    source = warm_start_trials(cfg, space) if cfg.sampler.warm_start is not None else None
    dim = len(space.bounds(cfg.models))
    return make_sampler(cfg.sampler.name, cfg.sampler_seed, cfg.sampler.options, dim=dim, source_trials=source)


__all__ = [
    "GRACE_S",
    "HEARTBEAT_S",
    "SEPARABLE_DIM",
    "ask",
    "auto_options",
    "add_portfolio_trial",
    "best_trial",
    "budget_count",
    "is_whole",
    "missing_portfolio",
    "by_state",
    "complete_trials",
    "distributions",
    "fail",
    "fail_stale_trials",
    "get_storage",
    "heartbeat",
    "load_study",
    "make_sampler",
    "objective_of",
    "open_run",
    "open_study",
    "pareto_front",
    "requeue",
    "sampler_for",
    "trial_by_number",
    "warm_start_trials",
]
