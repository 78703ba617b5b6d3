"""All Ray code: a pool of evaluator actors, each holding one resident model and one scorer.

An `Evaluator` loads the inputs once (Materializer) and builds its tasks once (Scorer); a trial then costs
one in-place merge plus one evaluation. The pool keeps a trial on every actor: no generation barrier.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.search.config import SearchConfig


@dataclass
class TrialResult:
    """What a worker hands back for one recipe: scores and timings, or the reason it failed."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    objective: float = float("nan")
    merge_s: float = 0.0
    eval_s: float = 0.0
    busy_s: float = 0.0  # the whole call in the worker (parse + merge + eval)
    wait_s: float = 0.0  # the worker idle before this call (waiting on the driver)
    worker: str = ""
    error: str | None = None
    worker_died: bool = False  # the worker process died (OOM, segfault, kill); the pool replaced it
    was_running: bool = False  # with worker_died: this trial was the one running, not one queued behind it

    @property
    def ok(self) -> bool:
        return self.error is None


class Evaluator:
    """The body of a worker (a plain class, so it also runs without Ray)."""

    def __init__(self, cfg_json: dict[str, Any], num_threads: int | None = None):
        self._cfg_json = cfg_json
        self._num_threads = num_threads
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.materializer = self.scorer = None
        self._last_end = time.perf_counter()

    def setup(self) -> str:
        """Load the inputs and build the tasks; errors are the user's (EvomergeError) or bugs."""
        from evomerge.offline import go_offline

        go_offline()
        import torch

        from evomerge.merge.materialize import Materializer
        from evomerge.scoring import Scorer, TaskSpec
        from evomerge.search.config import SearchConfig

        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        cfg = SearchConfig.model_validate(self._cfg_json)
        # num_gpus > 0: Ray gave this actor a GPU (CUDA_VISIBLE_DEVICES); the resident model evaluates there
        device = "cuda" if cfg.workers.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.materializer = Materializer([str(m) for m in cfg.models], str(cfg.base_model), dtype=cfg.dtype,
                                         device=device)
        tasks = [TaskSpec(**t.model_dump()) for t in cfg.tasks.search]
        self.scorer = Scorer(tasks, [str(p) for p in cfg.tasks.include_paths], seed=cfg.seed, device=device)
        self._last_end = time.perf_counter()
        return self.name

    def evaluate(self, recipe_yaml: str) -> TrialResult:
        start = time.perf_counter()
        result = self._evaluate(recipe_yaml)
        end = time.perf_counter()
        result.wait_s, result.busy_s = start - self._last_end, end - start
        self._last_end = end
        return result

    def _evaluate(self, recipe_yaml: str) -> TrialResult:
        from evomerge.recipe import Recipe

        result = TrialResult(worker=self.name)
        try:
            t0 = time.perf_counter()
            self.materializer.apply(Recipe.from_yaml(recipe_yaml, source="trial recipe"))
            t1 = time.perf_counter()
            result.merge_s = t1 - t0
            result.scores = self.scorer.score(self.materializer.model, self.materializer.tokenizer)
            result.objective = float(self.scorer.objective(result.scores))
            result.eval_s = time.perf_counter() - t1
        except EvomergeError as err:  # CandidateError (NaN weights) and friends: the candidate fails
            result.error = f"{type(err).__name__}: {err}"
            return result
        except Exception as err:  # an evaluation crash fails this trial, not the search
            tb = traceback.extract_tb(err.__traceback__)[-1]
            result.error = f"{type(err).__name__}: {err} (at {os.path.basename(tb.filename)}:{tb.lineno})"
            return result
        bad = [f"{t}.{m}" for t, ms in result.scores.items() for m, v in ms.items() if not math.isfinite(v)]
        if bad or not math.isfinite(result.objective):
            result.error = f"non-finite score ({', '.join(bad) or 'objective'})"
        return result


def _start_ray(cfg: SearchConfig) -> bool:
    """Join `workers.address`, or start a quiet local Ray sized to the workers. True if we started it."""
    import ray

    from evomerge.offline import OFFLINE_ENV
    from evomerge.search.config import cpus_needed
    from evomerge.threads import THREAD_ENV

    if ray.is_initialized():
        return False
    common = {
        "logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True,
        # workers are offline, and their idle OpenMP threads sleep, before their first import
        "runtime_env": {"env_vars": {**OFFLINE_ENV, **THREAD_ENV}},
    }  # fmt: skip
    if cfg.workers.address:
        ray.init(address=cfg.workers.address, **common)
    else:
        ray.init(num_cpus=cpus_needed(cfg), include_dashboard=False, **common)
    return True


class WorkerPool:
    """`count` evaluator actors, each with up to `depth` trials queued (the next one waits inside the actor,
    so a worker never idles while the driver tells and asks); `wait` returns finished results."""

    def __init__(self, cfg: SearchConfig, depth: int = 2):
        import ray

        self._ray = ray
        self.cfg, self.depth = cfg, depth
        self._started = _start_ray(cfg)
        self._remote = ray.remote(Evaluator).options(
            num_cpus=cfg.workers.num_cpus, num_gpus=cfg.workers.num_gpus, max_restarts=0
        )
        self._cfg_json = cfg.model_dump(mode="json")
        self.actors: list[Any] = []
        self.names: list[str] = []  # "host:pid" of each slot's actor
        self.queues: list[list[Any]] = []  # each slot's refs in submission order: the first one is running
        self.busy: dict[Any, tuple[int, Any, str]] = {}  # object ref -> (actor slot, actor, its name)
        self._running_at_death: dict[str, Any] = {}  # dead actor's name -> the ref it was running
        try:
            self.actors = [self._spawn() for _ in range(cfg.workers.count)]
            self.queues = [[] for _ in self.actors]
            self.names = self._ready(self.actors)
        except BaseException:
            self.close()
            raise

    def _spawn(self):
        return self._remote.remote(self._cfg_json, max(1, int(self.cfg.workers.num_cpus)))

    def _ready(self, actors: list) -> list[str]:
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get([a.setup.remote() for a in actors])
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, EvomergeError):
                raise type(cause)(str(cause)) from None
            raise

    @property
    def load(self) -> list[int]:
        return [len(q) for q in self.queues]

    @property
    def pids(self) -> list[int]:
        return [int(name.rsplit(":", 1)[1]) for name in self.names]

    @property
    def has_capacity(self) -> bool:
        return any(len(q) < self.depth for q in self.queues)

    def submit(self, recipe_yaml: str):
        slot = min(range(len(self.actors)), key=lambda i: len(self.queues[i]))
        ref = self.actors[slot].evaluate.remote(recipe_yaml)
        self.queues[slot].append(ref)
        self.busy[ref] = (slot, self.actors[slot], self.names[slot])
        return ref

    def wait(self, timeout: float | None = None) -> list[tuple[Any, TrialResult]]:
        """Results of the trials that finished (at least one, unless `timeout` passed first)."""
        from ray.exceptions import OutOfMemoryError, RayActorError, RayError, WorkerCrashedError

        if not self.busy:
            return []
        done, _ = self._ray.wait(list(self.busy), num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            slot, actor, name = self.busy.pop(ref)
            head = self.queues[slot][0]  # the trial the slot's actor is running (actors run their calls in order)
            self.queues[slot].remove(ref)
            try:
                result = self._ray.get(ref)
            except RayError as err:
                # the worker died (OOM, segfault, kill): its queued trials fail too, a fresh worker takes its place
                died = isinstance(err, (RayActorError, OutOfMemoryError, WorkerCrashedError))
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                what = "worker died" if died else f"worker error ({type(err).__name__})"
                if self.actors[slot] is actor:  # the first news of its death
                    self._running_at_death[name] = head
                    self._replace(slot)
                running = self._running_at_death.get(name) is ref
                result = TrialResult(worker=name, error=f"{what}: {name}: {first}", worker_died=died, was_running=running)
            out.append((ref, result))
        return out

    def _replace(self, slot: int) -> None:
        dead = self.actors[slot]
        self._ray.kill(dead, no_restart=True)
        fresh = self._spawn()
        self.names[slot] = self._ready([fresh])[0]
        self.actors[slot] = fresh

    def close(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors, self.queues, self.names, self.busy = [], [], [], {}
        if self._started:
            self._ray.shutdown()
            self._started = False


class InlinePool:
    """The WorkerPool interface with one Evaluator in this process, no Ray: for tests and debugging."""

    def __init__(self, cfg: SearchConfig):
        self.evaluator = Evaluator(cfg.model_dump(mode="json"))
        self.evaluator.setup()
        self.queue: list[tuple[object, str]] = []

    @property
    def has_capacity(self) -> bool:
        return not self.queue

    def submit(self, recipe_yaml: str):
        ref = object()
        self.queue.append((ref, recipe_yaml))
        return ref

    def wait(self, timeout: float | None = None) -> list[tuple[Any, TrialResult]]:
        if not self.queue:
            return []
        ref, text = self.queue.pop(0)
        return [(ref, self.evaluator.evaluate(text))]

    def close(self) -> None:
        self.queue = []


__all__ = ["Evaluator", "InlinePool", "TrialResult", "WorkerPool"]
