"""The Ray pools of workers, each an `Evaluator` (one resident model, one Scorer per task set): the one module
that imports Ray, but for the resource plan's cluster probe (`capacity/devices.py`, a task pinned to each node).

    pool = open_pool(cfg, {"search": cfg.tasks.search})        # Ray actors; in-process when workers.count is 0
    ref = pool.submit(recipe_yaml, "search")
    for ref, result in pool.wait(): ...                          # JobResult: scores and timings, or why it failed

The search keeps a trial on every actor (no generation barrier); the overfitting guard and the report submit
their jobs through the same kind of pool (`run_jobs`), so they score on the workers' devices too. A job's
failure is typed (`evaluator.is_candidate_failure`): the candidate's own failures come back as a JobResult
with `error`; any other exception in a worker is a bug and is raised in the driver with its traceback.

On a cluster (`workers.address`) the actors run on any node, in the Python that started that node's Ray
(`ray start`), importing the evomerge installed there: every node needs the same evomerge (a worker with
another version is refused before it loads anything) and the models and task folders at the config's paths.
A worker that dies is replaced in the background; its trials go to the live workers meanwhile.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.candidate.evaluator import Evaluation
from evomerge.errors import CandidateError, ConfigError, EvomergeError, first_line

if TYPE_CHECKING:
    from evomerge.candidate.evaluator import Evaluator
    from evomerge.capacity.devices import Devices
    from evomerge.config.schema import SearchConfig
    from evomerge.refine.job import PathPoint, RefineJob
    from evomerge.refine.rows import RowRefiner
    from evomerge.refine.tensor import Refiner
    from evomerge.scoring.tasks import TaskSpec

TaskSets = Mapping[str, Sequence["TaskSpec"]]


# What a worker hands back for one job (a recipe on a task set): the evaluator's own result type, with where and
# when it ran, or why it failed (`error`, `worker_died`).
JobResult = Evaluation


class Worker:
    """One pool slot: an Evaluator built once by `setup`, then one job per `run`. Ray wraps it as an actor;
    InlinePool runs it in the driver process."""

    def __init__(
        self,
        cfg_json: dict[str, Any],
        task_sets_json: dict[str, list[dict]],
        num_threads: int | None = None,
        driver_version: str | None = None,
    ):
        self._cfg_json, self._task_sets_json, self._num_threads = cfg_json, task_sets_json, num_threads
        self._driver_version = driver_version
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.evaluator: Evaluator | None = None  # built by `setup`, in the actor
        self._refiner: Refiner | RowRefiner | None = None
        self._refiner_kind: tuple | None = None
        self._last_end = time.perf_counter()

    def about(self) -> dict[str, str]:
        """Where this worker runs and which evomerge it imported (a cluster node's own installation)."""
        import evomerge

        return {
            "name": self.name,
            "version": evomerge.__version__,
            "python": sys.executable,
            "package": os.path.dirname(os.path.abspath(evomerge.__file__)),
        }

    def setup(self) -> dict[str, str]:
        """Load the inputs and build the task sets; errors are the user's (EvomergeError) or bugs. Returns `about()`."""
        from evomerge.offline import go_offline

        go_offline()
        about = self.about()
        if self._driver_version and about["version"] != self._driver_version:
            raise ConfigError(
                f"workers: the Ray worker {self.name} runs evomerge {about['version']} ({about['package']}) but the "
                f"driver runs {self._driver_version}; install evomerge=={self._driver_version} in the Python that "
                "runs `ray start` on every node"
            )
        import torch

        from evomerge.candidate.evaluator import Evaluator
        from evomerge.config.schema import SearchConfig
        from evomerge.scoring.tasks import TaskSpec

        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        cfg = SearchConfig.model_validate(self._cfg_json)
        task_sets = {name: [TaskSpec.model_validate(t) for t in specs] for name, specs in self._task_sets_json.items()}
        # num_gpus > 0: Ray gave this actor its GPUs (CUDA_VISIBLE_DEVICES); the resident model lives there, split
        # over them when there are several (merge/placement.py)
        from evomerge.merge.placement import group_devices

        devices = group_devices(cfg.workers.num_gpus)
        self.evaluator = Evaluator.for_config(cfg, task_sets, device=devices[0] if len(devices) == 1 else devices)
        if cfg.workers.batch_size is None:  # sized to the device, leaving room for a refinement round
            from evomerge.capacity.memory import device_batch

            refine_method = cfg.method if cfg.refine is not None else None
            for scorer in self.evaluator.scorers.values():
                scorer.batch_size = device_batch(self.evaluator.materializer, scorer, refine_method)
        self._last_end = time.perf_counter()
        return about

    @property
    def loaded(self) -> Evaluator:
        """The evaluator `setup` built (a job before `setup` is a bug)."""
        assert self.evaluator is not None, "Worker.setup() runs before any job"
        return self.evaluator

    def run(
        self, recipe_yaml: str, task_set: str, examples: bool = False, per_example: dict[str, Any] | None = None
    ) -> JobResult:
        """One job; `examples`: keep each task's per-example metric; `per_example`: keyword arguments of
        `Evaluator.evaluate_examples` (smooth, staged evaluation against an incumbent)."""
        from evomerge.candidate.evaluator import is_candidate_failure

        start, started = time.perf_counter(), time.time()
        try:
            if per_example is not None:
                result = self.loaded.evaluate_examples(recipe_yaml, task_set, **per_example)
            else:
                result = self.loaded.evaluate(recipe_yaml, task_set, examples)
            bad = result.non_finite()
            error = f"non-finite score ({', '.join(bad)})" if bad else None
        except Exception as err:
            if not is_candidate_failure(err):
                raise  # a bug: the driver stops with this traceback
            result, error = Evaluation(), f"{type(err).__name__}: {first_line(err)}"
        end = time.perf_counter()
        wait_s, self._last_end = start - self._last_end, end
        return replace(
            result, worker=self.name, error=error, started=started, ended=time.time(), wait_s=wait_s, busy_s=end - start
        )

    def refine(
        self, point: dict[str, float], job: RefineJob, progress: Callable[..., None] | None = None
    ) -> list[PathPoint]:
        """The gradient path of one refinement round from `point` on the search task set (refine/tensor.py for a
        tensor round, refine/rows.py for a per-row one, from `job.coefficients` when the start has them);
        `progress(step, loss, kept)` hears each step."""
        from evomerge.refine.job import PathPoint

        refiner, examples = self._refiner_for(job)
        settings = {"steps": job.steps, "every": job.every, "lr": job.lr, "progress": progress}
        if job.per_row:
            from evomerge.refine.rows import row_step

            settings["lr"] = row_step(job.lr, job.row_lr, sampled=job.examples is None and examples is not None)
            path = refiner.run(point, coefficients=job.coefficients, **settings)
            return [PathPoint(step, p, loss, rows) for step, p, loss, rows in path]
        return [PathPoint(step, p, loss) for step, p, loss in refiner.run(point, **settings)]

    def refine_stream(self, point: dict[str, float], job: RefineJob) -> Iterator[tuple]:
        """`refine` as a Ray streaming generator: ("step", step, loss, kept) after each Adam step, then ("path",
        path). The round runs in a thread of this actor while the generator hands its steps to the driver."""
        import queue

        steps: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["path"] = self.refine(point, job, lambda *step: steps.put(step))
            except BaseException as err:  # raised again in the actor's own thread, so Ray reports it
                outcome["error"] = err
            finally:
                steps.put(None)

        thread = threading.Thread(target=work, name="refine", daemon=True)
        thread.start()
        while (step := steps.get()) is not None:
            yield ("step", *step)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield ("path", outcome["path"])

    def _refiner_for(self, job: RefineJob) -> tuple[Any, int | None]:
        """The refiner of the job's kind, built once and kept while the rounds are of that kind, and the examples per
        task it trains on (None: each task's search subset)."""
        from evomerge.candidate.space import space_of
        from evomerge.config.schema import SearchConfig

        examples = job.examples
        if examples is None:  # a model too large for a step over the whole subsets trains on fewer examples
            from evomerge.refine.footprint import refine_examples

            examples = refine_examples(self.loaded.materializer, self.loaded.scorer("search"))
        kind = (job.per_row, job.loss, examples, job.balance)
        if self._refiner is not None and self._refiner_kind == kind:
            return self._refiner, examples
        cfg = SearchConfig.model_validate(self._cfg_json)
        args = (self.loaded.materializer, self.loaded.scorer("search"), space_of(cfg), cfg.models)
        if job.per_row:
            from evomerge.refine.rows import RowRefiner

            self._refiner = RowRefiner(
                *args,
                cfg.base_model,
                cfg.method,
                loss=job.loss,
                examples=examples,
                seed=cfg.seed,
                balance=job.balance,
            )
        else:
            from evomerge.refine.tensor import Refiner

            self._refiner = Refiner(
                *args,
                cfg.base_model,
                cfg.method,
                examples,
                seed=cfg.seed,  # the frozen masks are the ones the search's trials are merged with
                dtype=cfg.dtype,
                balance=job.balance,
            )
        self._refiner_kind = kind
        return self._refiner, examples


def task_sets_json(task_sets: TaskSets) -> dict[str, list[dict]]:
    return {name: [spec.model_dump(mode="json") for spec in specs] for name, specs in task_sets.items()}


def start_ray(cfg: SearchConfig) -> bool:
    """Join `workers.address`, or start a quiet local Ray sized to the workers. True if we started (or joined) it."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's C++ core replaces the process's SIGTERM handler with one that dumps a stack and aborts; keep the
    # caller's (the CLI's, evomerge.interrupts: SIGINT and SIGTERM stop a search, its trials requeued)
    main = threading.current_thread() is threading.main_thread()
    keep = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        return _init_ray(cfg)
    finally:
        for s, handler in keep.items():
            signal.signal(s, handler)


def check_ray(cfg: SearchConfig) -> None:
    """Once this process has started or joined Ray, before any worker starts: the GPUs Ray reports must hold
    `workers.count` x `workers.num_gpus` (an actor asking for more would wait forever), and on a cluster
    (`workers.address`) every node's memory is planned as `plan_search` plans this machine's."""
    import ray

    from evomerge.capacity import plan_search

    if cfg.workers.address:
        from evomerge.capacity.devices import cluster_devices

        plan_search(cfg, devices=cluster_devices(cfg.workers.address)).check()
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    need = cfg.workers.count * cfg.workers.num_gpus
    if need > have + 1e-9:
        where = "no GPU" if not have else f"{have:g} GPU(s)"
        fix = (
            "set workers.num_gpus: 0"
            if not have
            else f"set workers.count to at most {int(have // cfg.workers.num_gpus)}"
        )
        raise ConfigError(
            f"{cfg._source}: workers.num_gpus: {cfg.workers.count} worker(s) x {cfg.workers.num_gpus:g} GPU(s), but "
            f"Ray finds {where} here; {fix}"
        )


def cluster_of(cfg: SearchConfig) -> Devices:
    """The devices of the Ray cluster the config names (joined for the plan, then left)."""
    import ray

    from evomerge.capacity.devices import cluster_devices

    started = start_ray(cfg)
    try:
        return cluster_devices(cfg.workers.address or "auto")
    finally:
        if started:
            ray.shutdown()


def _init_ray(cfg: SearchConfig) -> bool:
    import ray

    from evomerge.config.schema import cpus_needed
    from evomerge.offline import OFFLINE_ENV
    from evomerge.threads import THREAD_ENV

    common: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
        # workers are offline, and their idle OpenMP threads sleep, before their first import
        "runtime_env": {"env_vars": {**OFFLINE_ENV, **THREAD_ENV}},
    }
    if not cfg.workers.address:
        ray.init(num_cpus=cpus_needed(cfg), include_dashboard=False, **common)
        return True
    address = cfg.workers.address
    fix = (
        "give the address `ray start --head` printed (host:port; auto on a node of the cluster), and with Ray's "
        "token authentication (its default) set RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN or "
        "~/.ray/auth_token) where the search runs"
    )
    why = _unreachable(address)  # Ray itself retries a dead address for many minutes before it gives up
    if why is None:
        try:
            ray.init(address=address, **common)
            return True
        except (ConnectionError, ValueError) as err:  # a malformed address, or the cluster refused us (its token)
            ray.shutdown()
            why = first_line(err)
    raise ConfigError(f"{cfg._source}: workers.address: cannot join the Ray cluster at {address!r} ({why}); {fix}")


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a host:port address (None when something listens, or for `auto` and ray:// ones)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            return None
    except OSError as err:
        return f"nothing answers at {host}:{port}: {err.strerror or err}"


class Pool(Protocol):
    """What the driver, the guard and the report ask of a pool: `WorkerPool` (Ray actors) and `InlinePool` (one
    worker in this process). A job's handle is opaque: `submit` returns it, `wait` hands it back with its result."""

    @property
    def has_capacity(self) -> bool: ...

    def submit(
        self,
        recipe_yaml: str,
        task_set: str = "search",
        examples: bool = False,
        per_example: dict[str, Any] | None = None,
    ) -> object: ...

    def wait(self, timeout: float | None = None) -> list[tuple[Any, JobResult]]: ...

    def refine(
        self, point: dict[str, float], job: RefineJob, progress: Callable[..., None] | None = None
    ) -> list[PathPoint]: ...

    def close(self) -> None: ...


class WorkerPool:
    """`count` Worker actors, each with up to `depth` jobs queued (the next one waits inside the actor, so a worker
    never idles while the driver tells and asks); `wait` returns finished results. `task_sets` default to the
    config's search tasks. A dead actor's slot is refilled in the background (`starting`): jobs go to the live
    slots meanwhile, and `wait` blocks on a replacement only when no slot is live."""

    def __init__(self, cfg: SearchConfig, task_sets: TaskSets | None = None, depth: int = 2):
        import ray

        self._ray = ray
        self.cfg, self.depth = cfg, depth
        self._started = start_ray(cfg)
        self._remote = ray.remote(Worker).options(
            num_cpus=cfg.workers.num_cpus, num_gpus=cfg.workers.num_gpus, max_restarts=0
        )
        self._cfg_json = cfg.model_dump(mode="json")
        self._task_sets_json = task_sets_json(task_sets or {"search": cfg.tasks.search})
        self.actors: list[Any] = []
        self.infos: list[dict[str, str]] = []  # each slot's actor: Worker.about() (name "host:pid", evomerge, python)
        self.queues: list[list[Any]] = []  # each slot's refs in submission order: the first one is running
        self.busy: dict[Any, tuple[int, Any, str]] = {}  # object ref -> (actor slot, actor, its name)
        self.starting: dict[Any, int] = {}  # setup ref of a replacement actor -> its slot (not live until it is done)
        self._running_at_death: dict[str, Any] = {}  # dead actor's name -> the ref it was running
        try:
            check_ray(cfg)  # GPUs Ray cannot give would leave the actors waiting forever: refuse first
            self.actors = [self._spawn() for _ in range(cfg.workers.count)]
            self.queues = [[] for _ in self.actors]
            self.infos = [self._ready(ref) for ref in [a.setup.remote() for a in self.actors]]
        except BaseException:
            self.close()
            raise

    def _spawn(self):
        from evomerge import __version__

        return self._remote.remote(
            self._cfg_json, self._task_sets_json, max(1, int(self.cfg.workers.num_cpus)), __version__
        )

    def _ready(self, setup_ref) -> dict[str, str]:
        """The worker's `about()` once its setup is done; its user error (a model missing on its node, another
        evomerge version) is raised here as the same EvomergeError, and exits 2."""
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get(setup_ref)
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, EvomergeError):
                raise type(cause)(str(cause)) from None
            raise

    @property
    def names(self) -> list[str]:
        """ "host:pid" of each slot's actor ("" while a replacement starts)."""
        return [info.get("name", "") for info in self.infos]

    @property
    def pids(self) -> list[int]:
        return [int(name.rsplit(":", 1)[1]) if name else 0 for name in self.names]

    def _live(self) -> list[int]:
        return [slot for slot in range(len(self.actors)) if slot not in self.starting.values()]

    @property
    def has_capacity(self) -> bool:
        return any(len(self.queues[slot]) < self.depth for slot in self._live())

    def submit(
        self,
        recipe_yaml: str,
        task_set: str = "search",
        examples: bool = False,
        per_example: dict[str, Any] | None = None,
    ):
        slot = min(self._live(), key=lambda i: len(self.queues[i]))
        ref = self.actors[slot].run.remote(recipe_yaml, task_set, examples, per_example)
        self.queues[slot].append(ref)
        self.busy[ref] = (slot, self.actors[slot], self.names[slot])
        return ref

    def wait(self, timeout: float | None = None) -> list[tuple[Any, JobResult]]:
        """Results of the jobs that finished (at least one, unless `timeout` passed first). A bug raised in a
        worker is raised here (RayTaskError, also an instance of the original exception type)."""
        from ray.exceptions import OutOfMemoryError, RayActorError, RayError, RayTaskError, WorkerCrashedError

        if not self.busy and not self.starting:
            return []
        done, _ = self._ray.wait([*self.busy, *self.starting], num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            if ref in self.starting:  # a replacement is ready: its slot takes jobs again
                self.infos[self.starting.pop(ref)] = self._ready(ref)
                continue
            slot, actor, name = self.busy.pop(ref)
            head = self.queues[slot][0]  # the trial the slot's actor is running (actors run their calls in order)
            self.queues[slot].remove(ref)
            try:
                result = self._ray.get(ref)
            except RayTaskError:
                raise  # Worker.run raised: a bug in evomerge, not this candidate's failure
            except RayError as err:
                # the worker died (OOM, segfault, kill): its queued trials fail too, a fresh worker takes its place
                died = isinstance(err, (RayActorError, OutOfMemoryError, WorkerCrashedError))
                first = first_line(err)[:200]
                what = "worker died" if died else f"worker error ({type(err).__name__})"
                if self.actors[slot] is actor:  # the first news of its death
                    self._running_at_death[name] = head
                    self._replace(slot)
                running = self._running_at_death.get(name) is ref
                result = JobResult(worker=name, error=f"{what}: {name}: {first}", worker_died=died, was_running=running)
            out.append((ref, result))
        while self.starting and not self._live():  # every slot is restarting: the driver has nowhere to send a job
            ready, _ = self._ray.wait(list(self.starting), num_returns=1)
            self.infos[self.starting.pop(ready[0])] = self._ready(ready[0])
        return out

    def refine(
        self, point: dict[str, float], job: RefineJob, progress: Callable[..., None] | None = None
    ) -> list[PathPoint]:
        """Run a refinement round on the least busy worker and wait for its path; `progress(step, loss, kept)`
        hears each Adam step as the worker takes it (a Ray streaming generator)."""
        slot = min(self._live(), key=lambda i: len(self.queues[i]))
        stream = self.actors[slot].refine_stream.options(num_returns="streaming").remote(point, job)
        for ref in stream:
            kind, *item = self._ray.get(ref)
            if kind == "path":
                return item[0]
            if progress:
                progress(*item)
        raise RuntimeError("a refinement round's stream ended without its path")

    def _replace(self, slot: int) -> None:
        """A fresh actor in the dead one's slot; it loads the inputs while the live slots keep working."""
        self._ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._spawn()
        self.infos[slot] = {}
        self.starting[self.actors[slot].setup.remote()] = slot

    def close(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors, self.queues, self.infos, self.busy, self.starting = [], [], [], {}, {}
        if self._started:
            self._ray.shutdown()
            self._started = False


class InlinePool:
    """The WorkerPool interface with one Worker in this process, no Ray (`workers.count: 0`: debugging, tests)."""

    def __init__(self, cfg: SearchConfig, task_sets: TaskSets | None = None):
        self.worker = Worker(cfg.model_dump(mode="json"), task_sets_json(task_sets or {"search": cfg.tasks.search}))
        self.worker.setup()
        self.queue: list[tuple[object, str, str, bool, dict | None]] = []

    @property
    def has_capacity(self) -> bool:
        return not self.queue

    def submit(
        self,
        recipe_yaml: str,
        task_set: str = "search",
        examples: bool = False,
        per_example: dict[str, Any] | None = None,
    ):
        ref = object()
        self.queue.append((ref, recipe_yaml, task_set, examples, per_example))
        return ref

    def wait(self, timeout: float | None = None) -> list[tuple[Any, JobResult]]:
        if not self.queue:
            return []
        ref, text, task_set, examples, per_example = self.queue.pop(0)
        return [(ref, self.worker.run(text, task_set, examples, per_example))]

    def refine(
        self, point: dict[str, float], job: RefineJob, progress: Callable[..., None] | None = None
    ) -> list[PathPoint]:
        return self.worker.refine(point, job, progress)

    def close(self) -> None:
        self.queue = []


def open_pool(cfg: SearchConfig, task_sets: TaskSets | None = None) -> Pool:
    """The config's workers: Ray actors (`workers.count` of them, on their CPUs/GPUs), or one in-process worker
    without Ray when the count is 0."""
    return InlinePool(cfg, task_sets) if cfg.workers.count == 0 else WorkerPool(cfg, task_sets)


def run_jobs(
    pool: Pool,
    jobs: Sequence[tuple[str, str]],
    labels: Sequence[str] | None = None,
    examples: bool = False,
    *,
    per_example: dict[str, Any] | Callable[[int], dict[str, Any] | None] | None = None,
    failed_ok: bool = False,
) -> Iterator[tuple[int, JobResult]]:
    """Score `jobs` ((recipe_yaml, task_set), duplicates scored once) on `pool`, keeping every worker busy;
    yields (index into jobs, result) as they finish. A failed job raises CandidateError naming its label, or with
    `failed_ok` is yielded like any result (`result.ok` False). `examples`: the results carry per-example values too
    (`JobResult.examples`); `per_example`: each job is scored per example (`Worker.run`), with these options or, a
    function of the job's index, with the options it gives when the job is submitted (an incumbent that moves)."""
    first: dict[tuple[str, str], int] = {}
    for i, job in enumerate(jobs):
        first.setdefault(job, i)
    waiting = list(first.items())
    running: dict[Any, tuple[tuple[str, str], int]] = {}
    while waiting or running:
        while waiting and pool.has_capacity:
            job, i = waiting.pop(0)
            options = per_example(i) if callable(per_example) else per_example
            running[pool.submit(*job, examples=examples, per_example=options)] = (job, i)
        for ref, result in pool.wait():
            job, i = running.pop(ref)
            if not result.ok and not failed_ok:
                label = labels[i] if labels else f"job {i}"
                raise CandidateError(f"{label}: {result.error}")
            for j, other in enumerate(jobs):
                if other == job:
                    yield j, result


__all__ = ["InlinePool", "JobResult", "Pool", "Worker", "WorkerPool", "open_pool", "run_jobs"]
