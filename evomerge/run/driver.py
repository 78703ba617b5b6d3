"""The search loop: ask a trial, merge and score it on a free worker, tell the result; resume for free.

    evomerge search configs/demo.yaml [--n-trials N] [--storage URL] [--workers K] [--force]

Each worker holds up to two trials (one running, one queued inside the actor); whenever one finishes
(`ray.wait`, one at a time) its result is told and the next trial is asked, so no worker waits for a
generation or for the driver's bookkeeping. The budget counts COMPLETE trials: failed
candidates (the user's errors, NaN/Inf weights or scores, out of memory, an exception in the user's task
code: `evaluator.is_candidate_failure`) are recorded with `fail_reason` and replaced; any other exception
is a bug and stops the search with its traceback (exit 1), its in-flight trials enqueued again. One driver
runs a study at a time (`StudyLock`); a killed driver's trials are failed and enqueued again by the next
run, and so are the trials of a worker that died (at most MAX_WORKER_DEATHS times for the same params).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.candidate.baseline import BaselineLabel
from evomerge.candidate.portfolio import portfolio_merges, portfolio_methods
from evomerge.candidate.space import SearchSpace, space_of
from evomerge.config.resolve import resolve_config
from evomerge.config.schema import SearchConfig, write_run_config
from evomerge.errors import EvomergeError, Interrupted, StudyError
from evomerge.refine.job import RefineJob
from evomerge.refine.rows import load_coefficients, save_coefficients, with_coefficients
from evomerge.run.pool import JobResult, Pool, open_pool, run_jobs
from evomerge.study import study as st
from evomerge.study.lock import HEARTBEAT_S, StudyLock
from evomerge.study.record import TrialRecord, trial_attrs, write_trial
from evomerge.study.samplers import distributions
from evomerge.study.storage import check_reachable, load_study
from evomerge.study.trials import best_trial, budget_count, by_state, complete_trials, is_whole, objective_of, ranked

if TYPE_CHECKING:
    from evomerge.scoring.scorer import Scorer
    from evomerge.study.record import FrozenTrial, LiveTrial, Study

MAX_WORKER_DEATHS = 2  # retries of params whose worker died while evaluating them; then the trial fails
QUIET_S = 40.0  # after this long without a word, a line (or the bar's clock); checked every QUIET_S / 2: under a minute


@dataclass
class SearchResult:
    name: str
    run_dir: Path
    storage: str
    n_complete: int
    n_failed: int  # in this run
    best_trial: int | None
    best_value: float | None
    timings: list[dict[str, float]] = field(default_factory=list)  # this run's completed trials
    wall_s: float = 0.0  # this run, from the first ask to the last tell
    budget: int = 0  # budget.n_trials
    timeout: float | None = None  # budget.timeout
    stop: str = ""  # why this run stopped: "budget" (met), "timeout" (budget.timeout), "complete" (nothing to do)
    resumed: bool = False  # the study had trials before this run
    requeued: list[int] = field(default_factory=list)  # trials in flight when this run stopped: they run again first

    @classmethod
    def of(cls, cfg: SearchConfig) -> SearchResult:
        """An empty result for a run of `cfg` (the driver fills it in)."""
        return cls(
            cfg.name,
            cfg.run_dir,
            cfg.storage_url,
            0,
            0,
            None,
            None,
            budget=cfg.budget.n_trials,
            timeout=cfg.budget.timeout,
        )


@dataclass
class _InFlight:
    trial: Any
    started: float


class _Progress:
    """A tqdm bar: COMPLETE trials / budget, best score and its trial, trials per minute. Without the bar
    (`--no-progress`, or not a terminal) the same figures as a line every tenth of the budget, through `log`."""

    def __init__(self, cfg: SearchConfig, done: int, enabled: bool, log: Callable[[str], None] | None = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=cfg.budget.n_trials,
            initial=done,
            desc=cfg.name,
            unit="trial",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
        )
        self.name, self.total, self.done = cfg.name, cfg.budget.n_trials, done
        self.log = None if enabled else log
        self.every = max(1, round(cfg.budget.n_trials / 10))
        self.start, self.new = time.perf_counter(), 0
        self.last_word = time.monotonic()  # when the bar or a line last said something

    def stage(self, what: str = "") -> None:
        """Name what is happening on the bar (`portfolio 2/6`, `refinement round 1/2, step 20/60`; "" for trials)."""
        self.bar.set_description(f"{self.name} [{what}]" if what else self.name)
        self.last_word = time.monotonic()

    def say(self, line: str, log: Callable[[str], None]) -> None:
        """A line through `log` (above the bar when it shows)."""
        if self.bar.disable:
            log(line)
        else:
            self.bar.write(line, file=sys.stderr)
        self.last_word = time.monotonic()

    def still(self, what: str, log: Callable[[str], None]) -> None:
        """No word for QUIET_S: the bar refreshes its clock, or a line says `what` is still going."""
        if time.monotonic() - self.last_word < QUIET_S:
            return
        if self.bar.disable:
            log(f"{self.name}: {self.done}/{self.total} complete; {what}")
        else:
            self.bar.refresh()
        self.last_word = time.monotonic()

    def update(self, best_number: int | None, best_value: float | None, failed: int, completed: bool) -> None:
        self.new += completed
        self.done += completed
        rate = self.new / max(time.perf_counter() - self.start, 1e-9) * 60
        best = "-" if best_value is None else f"{best_value:.3f} (#{best_number})"
        post: dict[str, Any] = {"best": best, "rate": f"{rate:.1f}/min"}
        if failed:
            post["failed"] = failed
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(int(completed))
        if self.log and completed and (self.done % self.every == 0 or self.done == self.total):
            fails = f", {failed} failed" if failed else ""
            self.log(f"{self.name}: {self.done}/{self.total} complete, best {best}, {rate:.1f} trials/min{fails}")
            self.last_word = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def run_search(
    cfg: SearchConfig,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    pool_factory: Callable[[SearchConfig], Any] | None = None,
) -> SearchResult:
    """Run (or resume) the study until it has `budget.n_trials` COMPLETE trials or `budget.timeout` passes.

    `pool_factory(cfg)` makes the workers (default: `run.pool.open_pool`: Ray actors, or one in this
    process when `workers.count` is 0). One driver per study: a second one raises StudyError naming the first.
    """
    log = log or (lambda _msg: None)
    check_reachable(cfg.storage_url, cfg._source)  # a server out of reach fails in seconds, before the tasks load
    space = space_of(cfg)
    resolved = resolve_config(cfg)  # a bad task fails before the study, its lock or runs/<name>/ exist
    for line in resolved.notes:
        log(line)
    cfg = resolved.config
    plan, kept = _plan(cfg, resolved.scorer, log)  # what it needs against the devices: one that cannot fit exits 2
    if kept is not None:  # `portfolio: true` without the subspace merges that would outlast the search (the plan says)
        cfg = cfg.model_copy(update={"portfolio": kept})
    with StudyLock(cfg.storage_url, cfg.name) as lock:  # before open_study: --force must not delete a live study
        if force and (existing := load_study(cfg.name, cfg.storage_url)) is not None:
            lock.check_free(existing)
        study = st.open_study(cfg, space, force=force, log=log)
        lock.claim(study)
        write_run_config(cfg)
        result = SearchResult.of(cfg)
        n_complete = budget_count(study)
        result.resumed = any(t.state.name != "WAITING" for t in study.get_trials(deepcopy=False))
        log(_start_line(cfg, result.resumed, n_complete))
        st.fail_stale_trials(study, log=log, exclusive=True)
        if n_complete >= cfg.budget.n_trials:
            result.stop = "complete"
            log(
                f"study {cfg.name!r} already has {n_complete} complete trials (budget {cfg.budget.n_trials}); "
                f"raise --n-trials to go on"
            )
            return _finish(study, result)
        for line in plan:
            log(line)
        for line in _schedule(cfg, space).lines(cfg):  # what the budget buys; one the defaults use up is said here
            log(line)
        search = _Search(study, cfg, space, lock, result, n_complete, log)
        try:
            search.run(pool_factory or open_pool, progress)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI's handler: say how to go on
            raise _interrupted(exc, cfg, study, result) from None
    return _finish(study, result, log)


def _plan(cfg: SearchConfig, scorer: Scorer | None, log: Callable[[str], None]) -> tuple[list[str], list[str] | None]:
    """The resource plan's lines (evomerge/capacity), logged after the start line, and the portfolio's methods it
    keeps where it leaves some out (else None); one that cannot fit this machine is logged now and refused
    (ConfigError naming the setting), before the study is touched. A Ray cluster's nodes are checked by the pool
    once it has joined them, still before any worker loads a model."""
    from evomerge.capacity import plan_search

    plan = plan_search(cfg, scorer)
    lines = plan.lines() if not cfg.workers.address else plan.lines()[:2]
    if plan.problems and not cfg.workers.address:
        for line in lines:
            log(line)
        plan.check()
    return lines, list(plan.settings.portfolio) if plan.left_out else None


def _schedule(cfg: SearchConfig, space: SearchSpace):
    """The budget's schedule: baselines, the portfolio's default merges, refinement rounds, sampled trials."""
    from evomerge.capacity.schedule import Schedule

    return Schedule.of(cfg, len(space.baselines(cfg.models)), len(portfolio_merges(cfg)))


def _interrupted(exc: KeyboardInterrupt, cfg: SearchConfig, study: Study, result: SearchResult) -> Interrupted:
    done = budget_count(study)
    again = (
        f" (trials {', '.join(map(str, result.requeued))} were running: they run again first)"
        if result.requeued
        else ""
    )
    return Interrupted(
        getattr(exc, "signal_name", "SIGINT"),
        f"search {cfg.name!r} stopped at {done}/{cfg.budget.n_trials} complete{again}; run the same command to resume",
    )


def _start_line(cfg: SearchConfig, resumed: bool, n_complete: int) -> str:
    """New or resumed, and where the study and its run directory live (both relative to the current folder
    unless the config says otherwise)."""
    where = f"in {cfg.storage_url}; run directory {cfg.run_dir.resolve()}"
    if resumed:
        return f"resuming study {cfg.name!r}: {n_complete}/{cfg.budget.n_trials} complete, {where}"
    return f"new study {cfg.name!r} ({cfg.budget.n_trials} trials) {where}"


class _Search:
    """One run of the search over a study this driver holds (so its counts are exact): the portfolio first, then a
    loop of ask, submit, wait, tell, with refinement rounds where they are due and the failure policy.

    The steps are methods, so a new kind of step is one more method the loop calls: `_portfolio` (other methods'
    default merges, scored like any batch), `_refining` (a refinement round, one `RefineJob` to a worker, when its
    share of the budget is reached), `_ask` / `_submit` (a trial to a worker), `_tell` (record it), `_keep_alive`
    (lock and heartbeats).
    """

    def __init__(
        self,
        study: Study,
        cfg: SearchConfig,
        space: SearchSpace,
        lock: StudyLock,
        result: SearchResult,
        n_complete: int,
        log: Callable[[str], None],
    ):
        self.study, self.cfg, self.space, self.lock, self.result, self.log = study, cfg, space, lock, result, log
        self.n_complete = n_complete
        self.distributions = distributions(space, cfg.models)
        self.in_flight: dict[Any, _InFlight] = {}
        self.deadline = time.monotonic() + cfg.budget.timeout if cfg.budget.timeout else math.inf
        self.failures = 0  # consecutive failed trials
        self.max_failures = max(5, 2 * cfg.workers.count)
        self.last_beat = time.monotonic()
        self.best: FrozenTrial | None = None  # the best whole trial so far, once the portfolio is in
        self.incumbent = _Incumbent(cfg, None)
        self.rounds = _RefineRounds(study, cfg)
        self.pool: Pool  # both set by `run`, before the loop
        self.bar: _Progress

    def run(self, pool_factory: Callable[[SearchConfig], Any], progress: bool) -> None:
        n = self.cfg.workers.count
        # Ray and each worker's model and tasks take 10-20 s to start: say so before the bar sits at 0
        self.log(
            f"starting {n} worker{'s' * (n != 1)} (Ray; each loads the models and builds the tasks)..."
            if n
            else "loading the models and tasks in this process (workers.count: 0)..."
        )
        self.pool = pool_factory(self.cfg)
        start = time.perf_counter()
        self.bar = _Progress(self.cfg, self.n_complete, progress, self.log)
        try:
            if portfolio_methods(self.cfg):
                self._portfolio()
            self.best = best_trial(self.study)  # the portfolio's default merges included
            self.incumbent = _Incumbent(self.cfg, self.best)
            self._loop()
            self.result.stop = "budget" if self.n_complete >= self.cfg.budget.n_trials else "timeout"
        finally:
            self._requeue_running()
            self.result.wall_s = time.perf_counter() - start
            self.bar.close()
            self.pool.close()

    def _loop(self) -> None:
        while True:
            if not self._refining():
                while self._can_ask():
                    self._submit(*self._ask())
            if not self.in_flight:
                return
            for ref, res in self.pool.wait(timeout=min(HEARTBEAT_S, QUIET_S / 2)):
                self._tell(self.in_flight.pop(ref), res)
            self._keep_alive()
            if self.in_flight:
                now = time.perf_counter()
                running = ", ".join(f"{j.trial.number} ({now - j.started:.0f} s)" for j in self.in_flight.values())
                self.bar.still(f"trial(s) {running} in flight", self.log)

    # -- the steps -------------------------------------------------------------------------------------------

    def _refining(self) -> bool:
        """Run the refinement round that is due once nothing is in flight (its points are enqueued: the asks after
        it take them first); True while a due round waits for the trials in flight."""
        due = self.rounds.due(self.n_complete + len(self.in_flight))
        if due is None:
            return False
        if self.in_flight or time.monotonic() >= self.deadline:
            return True
        self.rounds.run(due, self.pool, self.space, self.bar, self.log)
        self.bar.stage()
        return False

    def _can_ask(self) -> bool:
        return (
            self.pool.has_capacity
            and self.n_complete + len(self.in_flight) < self.cfg.budget.n_trials
            and time.monotonic() < self.deadline
        )

    def _ask(self) -> tuple[Any, float]:
        return st.ask(self.study, self.distributions), time.perf_counter()

    def _submit(self, trial: LiveTrial, started: float) -> None:
        """The trial's recipe to a free worker; an invalid point (e.g. DELLA's density +/- epsilon) fails as a
        candidate, any other error fails the trial and stops the search."""
        cfg = self.cfg
        try:
            recipe = self.space.to_recipe(
                trial.params, cfg.models, cfg.base_model, cfg.method, cfg.seed, cfg.dtype, kernels=cfg.kernels
            )
            recipe = with_coefficients(recipe, TrialRecord.from_trial(trial).coefficients)  # a per-row point
            text = recipe.to_yaml()
            write_trial(trial, recipe=text)
            self.in_flight[self.pool.submit(text, "search", per_example=self.incumbent.options(trial))] = _InFlight(
                trial, started
            )
        except EvomergeError as err:
            st.fail(self.study, trial, f"{type(err).__name__}: {err}")
            self._failed(str(err))
        except BaseException as err:
            st.fail(self.study, trial, f"driver error: {type(err).__name__}: {err}")
            raise

    def _tell(self, job: _InFlight, res: JobResult) -> None:
        """Record one result (module-level `_tell`), count it, and stop after too many failures in a row."""
        told = _tell(self.study, self.cfg, job, res, self.result)
        if told is not None:
            self.failures = 0
            self.n_complete += 1
            if is_whole(told) and (self.best is None or objective_of(told) > objective_of(self.best)):
                self.best = told
                self.incumbent.update(told)
        else:
            self.result.n_failed += 1
            self.failures += not (res.worker_died and not res.was_running)  # a queued trial is no one's fault
        best = self.best
        self.bar.update(
            best.number if best else None,
            objective_of(best) if best else None,
            self.result.n_failed,
            told is not None,
        )
        if self.failures >= self.max_failures:
            self._failed(str(res.error), counted=True)

    def _failed(self, last: str, counted: bool = False) -> None:
        """Count a failed candidate (unless `counted`); raise StudyError after `max_failures` in a row."""
        if not counted:
            self.result.n_failed += 1
            self.failures += 1
        if self.failures >= self.max_failures:
            hint = f"; see `evomerge status {self.cfg.run_dir}`" if counted else ""
            raise StudyError(f"study {self.cfg.name!r}: the last {self.failures} trials failed (last: {last}){hint}")

    def _keep_alive(self) -> None:
        self.lock.check()  # its heartbeat thread found the study taken over: stop (in-flight trials are enqueued again)
        if time.monotonic() - self.last_beat > HEARTBEAT_S:
            st.heartbeat(job.trial for job in self.in_flight.values())
            self.last_beat = time.monotonic()

    def _requeue_running(self) -> None:
        """Interrupted or failed: trials still RUNNING fail now and are enqueued again, instead of going stale. This
        driver holds the study, so every RUNNING trial is one of its own: those in flight, and one a stop caught
        inside `ask` or between a tell and its bookkeeping."""
        for trial in by_state(self.study).get("RUNNING", []):
            reason = "interrupted: the search stopped before it finished"
            st.requeue(self.study, trial, reason, worker_deaths=TrialRecord.from_trial(trial).worker_deaths)
            self.result.requeued.append(trial.number)

    def _portfolio(self) -> None:
        """Score every other method's default merge on the search subsets through the pool, in parallel like any
        batch, and add each to the study once (in the portfolio's order), so the guard, status and export weigh the
        searched recipes against the whole portfolio, not only this method's defaults
        (evomerge/candidate/portfolio.py). A default merge that fails here (NaN weights, say) is simply not a
        finalist."""
        cfg = self.cfg
        merges = portfolio_merges(cfg)
        missing = set(st.missing_portfolio(self.study, [label for label, _ in merges]))
        todo = [(label, recipe.to_yaml()) for label, recipe in merges if label in missing]
        options = {"smooth": cfg.tasks.smooth, "seed": cfg.seed} if cfg.per_example else None
        jobs = [(text, "search") for _, text in todo]
        done: dict[int, Any] = {}
        added = 0
        if todo:
            methods = ", ".join(label.method or str(label) for label, _ in todo)
            self.bar.say(
                f"portfolio: scoring {len(todo)} default merges of other methods ({methods}) on the search tasks "
                "before the first trial (references for the guard and export; outside the budget)",
                self.log,
            )
            self.bar.stage(f"portfolio 0/{len(todo)}")
        for i, res in run_jobs(self.pool, jobs, per_example=options, failed_ok=True):
            done[i] = res
            while added in done:  # in order, each as soon as the ones before it are in
                res = done.pop(added)
                self._add_portfolio(*todo[added], res)
                added += 1
                score = f"{res.objective:.3f}" if res.ok else f"failed ({res.error})"
                self.bar.say(
                    f"portfolio {added}/{len(todo)}: {todo[added - 1][0].method} default merge {score}", self.log
                )
                self.bar.stage(f"portfolio {added}/{len(todo)}")
        self.bar.stage()

    def _add_portfolio(self, label: BaselineLabel, text: str, res) -> None:
        cfg = self.cfg
        if not res.ok:
            self.result.n_failed += 1
            return
        per_example = {"examples": res.examples, "examples_scored": res.n_examples}
        record = TrialRecord(
            recipe=text,
            scores=res.scores,
            objective=res.objective,
            merge_s=res.merge_s,
            eval_s=res.eval_s,
            total_s=res.wait_s + res.busy_s,
            worker=res.worker,
            **(per_example if cfg.per_example and res.examples else {}),
        )
        values = [res.scores[t.name][t.metric] for t in cfg.tasks.search] if cfg.multi_objective else res.objective
        st.add_portfolio_trial(self.study, self.space, cfg.models, label, values, record)


class _Incumbent:
    """What per-example scoring needs with each job: the smoothing share, and for a sampled trial under
    `early_stop` the best whole trial's per-example units to stop against (baselines and refine points are
    always scored whole: they are references, or likely good)."""

    def __init__(self, cfg: SearchConfig, best: FrozenTrial | None):
        self.cfg = cfg
        self.units: dict | None = None
        self.objective: float | None = None
        if best is not None:
            self.update(best)

    def update(self, best: FrozenTrial) -> None:
        units = TrialRecord.from_trial(best).examples  # int keys (the record reads the JSON form)
        if units is not None:
            self.units = units
            self.objective = objective_of(best)

    def options(self, trial: LiveTrial) -> dict[str, Any] | None:
        if not self.cfg.per_example:
            return None
        out: dict[str, Any] = {"smooth": self.cfg.tasks.smooth, "seed": self.cfg.seed}
        enqueued = TrialRecord.from_trial(trial).enqueued
        if self.cfg.early_stop is not None and not enqueued and self.units is not None:
            out.update(
                stages=self.cfg.early_stop.stages,
                z=self.cfg.early_stop.z,
                incumbent=self.units,
                incumbent_objective=self.objective,
            )
        return out


class _RefineRounds:
    """The config's gradient-refinement rounds (refine/tensor.py per tensor, refine/rows.py per row): which are
    done (their trials carry `refine_round`), which is due at the current count, and running one from the best
    trial so far."""

    def __init__(self, study: Study, cfg: SearchConfig):
        self.study, self.cfg = study, cfg
        self.starts = cfg.refine.starts(cfg.budget.n_trials) if cfg.refine is not None else []
        rounds = (TrialRecord.from_trial(t).refine_round for t in study.get_trials(deepcopy=False))
        self.done = set(rounds) - {None}

    def due(self, count: int) -> int | None:
        """The first round not run yet whose start the trial count (complete and in flight) has reached."""
        for r, start in enumerate(self.starts):
            if r not in self.done and count >= start:
                return r
        return None

    def run(self, r: int, pool: Pool, space: SearchSpace, bar: _Progress, log: Callable[[str], None]) -> None:
        """Round `r`, of kind `refine.arm(r)`: a per-tensor round starts from the best trial without per-row
        coefficients (what it moves is all of its start), a per-row one from the best trial, continuing its
        coefficients if it has some."""
        self.done.add(r)
        refine = self.cfg.refine
        assert refine is not None, "a round is due only with refine set"
        arm = refine.arm(r)
        own = ranked(complete_trials(self.study), own=True)
        best = next((t for t in own if arm != "tensor" or TrialRecord.from_trial(t).coefficients is None), None)
        if best is None or not best.params:
            return
        steps, every = refine.schedule(self.cfg.budget.n_trials)
        start = load_coefficients(TrialRecord.from_trial(best).coefficients) if arm != "tensor" else None
        job = RefineJob(
            arm,
            steps,
            every,
            refine.lr,
            examples=refine.examples,
            coefficients=start,
            row_lr=None if refine.row_lr == "auto" else refine.row_lr,
            balance=refine.balance,
        )
        bounds = space.bounds(self.cfg.models)
        said = _RoundProgress(f"refinement round {r + 1}/{len(self.starts)}", steps, bar, log)
        said.start(f"({arm}): {steps} Adam steps from trial {best.number}, a point every {every}")
        path = pool.refine(dict(best.params), job, progress=said.step)
        said.end(len(path) - 1)
        for at in path:
            if at.step == 0:
                continue  # the starting point: trial `best` itself
            point = {k: bounds[k].clip(v) for k, v in at.point.items()}
            ref = save_coefficients(self.cfg.run_dir, at.coefficients) if at.coefficients is not None else None
            attrs = trial_attrs(
                refine_round=r,
                refine_arm=arm,
                refine_step=at.step,
                refined_from=best.number,
                surrogate_loss=at.loss,
                coefficients=ref,
            )
            self.study.enqueue_trial(point, user_attrs=attrs)


class _RoundProgress:
    """A refinement round, said: a line at its start, its step on the bar (and a line at each enqueued point, or
    after QUIET_S without one, when there is no bar), a line at its end."""

    def __init__(self, name: str, steps: int, bar: _Progress, log: Callable[[str], None]):
        self.name, self.steps, self.bar, self.log = name, steps, bar, log
        self.started = time.perf_counter()

    def start(self, what: str) -> None:
        self.bar.say(f"{self.name} {what}; trials wait for it", self.log)
        self.bar.stage(f"{self.name}, step 0/{self.steps}")

    def step(self, step: int, loss: float, point: bool = False) -> None:
        """Called by the worker's refiner after each Adam step (`point`: one enqueued as a trial)."""
        self.bar.bar.set_description(f"{self.bar.name} [{self.name}, step {step}/{self.steps}]", refresh=False)
        quiet = time.monotonic() - self.bar.last_word >= QUIET_S
        if (point and step) or quiet:
            elapsed = time.perf_counter() - self.started
            self.bar.say(
                f"{self.name}: step {step}/{self.steps}, surrogate loss {loss:.4f} ({elapsed:.0f} s)", self.log
            )
        elif not self.bar.bar.disable:
            self.bar.bar.refresh()

    def end(self, points: int) -> None:
        elapsed = time.perf_counter() - self.started
        self.bar.say(f"{self.name} done in {elapsed:.0f} s: {points} points enqueued as the next trials", self.log)


def _tell(study: Study, cfg: SearchConfig, job: _InFlight, res: JobResult, result: SearchResult) -> FrozenTrial | None:
    """Record one finished trial (user attrs, then tell): the FrozenTrial if it completed, else None.

    A trial whose worker died is enqueued again, up to MAX_WORKER_DEATHS times for params that were running
    when it died (they may be what kills workers); then it fails for good with the reason.
    """
    trial = job.trial
    timing = TrialRecord(
        merge_s=res.merge_s,
        eval_s=res.eval_s,
        total_s=res.wait_s + res.busy_s,
        latency_s=time.perf_counter() - job.started,
        worker=res.worker,
    )
    if res.ok and not math.isfinite(res.objective):  # never a best trial, whatever a worker reports
        res.error = f"non-finite objective {res.objective}"
    if res.worker_died and res.error is not None:  # a dead worker's result always says why
        deaths = TrialRecord.from_trial(trial).worker_deaths + res.was_running
        if deaths <= MAX_WORKER_DEATHS:
            st.requeue(study, trial, res.error, timing, worker_deaths=deaths)
            return None
        res.error = f"{res.error} (its worker died {deaths} times on these params; not retried again)"
    if res.error is not None:  # not res.ok
        st.fail(study, trial, res.error, timing)
        return None
    scored: dict[str, Any] = {}
    if cfg.per_example:
        scored["examples_scored"] = res.n_examples
        if res.stopped:
            scored["stopped_early"] = True  # scored on a part of the subsets: never the best trial or a finalist
        elif res.examples:
            scored["examples"] = res.examples
    told = TrialRecord.model_validate({**timing.to_attrs(), **scored})
    write_trial(trial, told, scores=res.scores, objective=res.objective)
    values: list[float] | float = (
        [res.scores[t.name][t.metric] for t in cfg.tasks.search] if cfg.multi_objective else res.objective
    )
    frozen = study.tell(trial, values)
    result.timings.append(told.to_attrs())
    return frozen


def _finish(study: Study, result: SearchResult, log: Callable[[str], None] | None = None) -> SearchResult:
    result.n_complete = budget_count(study)
    best = best_trial(study)
    if best is not None:
        result.best_trial, result.best_value = best.number, objective_of(best)
    if not log or best is None:
        return result
    budget, done = result.budget, result.n_complete
    summary = f"({result.n_failed} failed this run); best: trial {best.number} with {result.best_value:.4f}"
    if result.stop == "timeout":
        log(
            f"stopped by budget.timeout ({result.timeout:g} s) at {done}/{budget} complete trials {summary}; "
            f"the budget is not met: run the same command to continue (it resumes the study), or raise "
            f"budget.timeout; `evomerge export {result.run_dir}` exports the best so far"
        )
    else:
        log(f"budget met: {done}/{budget} complete trials {summary}; next: evomerge export {result.run_dir}")
    return result


__all__ = ["MAX_WORKER_DEATHS", "SearchResult", "run_search"]
