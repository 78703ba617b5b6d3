"""The resource plan: each worker's and each node's memory against the devices, printed, and refused when it
cannot fit, before any model loads.

    plan = plan_search(cfg)                    # the inputs' headers, the config, this machine (or a given one)
    print("\\n".join(plan.lines()))
    plan.check()                               # ConfigError (exit 2) naming the setting to change
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evomerge.candidate.portfolio import portfolio_methods
from evomerge.capacity.devices import Devices, local_devices
from evomerge.capacity.facts import ModelFacts, TaskFacts, gb
from evomerge.capacity.memory import (
    CUDA_CONTEXT,
    DEVICE_SHARE,
    RAY_NODE,
    RUNTIME_HOST,
    Settings,
    WorkerMemory,
    worker_memory,
)
from evomerge.capacity.timing import TrialTime
from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from evomerge.config.schema import SearchConfig


def _count(params: int) -> str:
    """A parameter count as people write it: 0.50B, 6.74B; 148M; 0.39M for the zoo's tiny models."""
    if params >= 5e8:
        return f"{params / 1e9:.2f}B"
    return f"{params / 1e6:.0f}M" if params >= 1e7 else f"{params / 1e6:.2f}M"


@dataclass
class Plan:
    """What a search needs (`worker`, `page_cache`) and whether `devices` hold it (`problems`: one line each,
    naming the setting to change; `warnings`: it runs, but slowly)."""

    model: ModelFacts
    tasks: TaskFacts
    settings: Settings
    worker: WorkerMemory
    devices: Devices
    source: str = "search config"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timing: TrialTime | None = None  # seconds per trial by part (capacity/timing.py), when the plan has a schedule
    night: tuple[int, int] = (0, 0)  # (trials of the budget, portfolio merges) the time lines count
    export: tuple[int, float, float] | None = None  # (finalists the export's guard validates at most, mean seconds
    # each, the longest: a portfolio merge by a subspace method)
    staged_guard: bool = False  # validation.early_stop: the guard stops clearly worse finalists early
    # (method, seconds of its default merge) that `portfolio: true` leaves out: subspace merges outlasting the trials
    left_out: tuple[tuple[str, float], ...] = ()

    @property
    def page_cache(self) -> int:
        """The memory-mapped inputs' pages on a node (shared by its workers)."""
        return sum(self.model.input_bytes)

    @property
    def on_gpu(self) -> bool:
        return self.settings.num_gpus > 0

    def node_bytes(self, workers: int, driver: bool) -> int:
        """Host memory of a node running `workers` workers (and the driver): each worker's own, the page cache
        once, Ray's processes, the driver."""
        ray = RAY_NODE if self.settings.count > 0 else 0
        drv = RUNTIME_HOST if driver and self.settings.count > 0 else 0
        return workers * self.worker.host + self.page_cache + ray + drv + self.worker.portfolio_cache

    def lines(self) -> list[str]:
        """The plan in three lines (and its warnings): the inputs, one worker, a node."""
        m, w, s = self.model, self.worker, self.settings
        n = len(m.input_bytes)
        same = len(set(m.input_bytes)) == 1
        each = f"{n} x {gb(m.input_bytes[0])}" if same else " + ".join(gb(b) for b in m.input_bytes)
        out = [
            f"plan: inputs {each} (base + {n - 1} model{'s' * (n != 2)}, {_count(m.params)} parameters), "
            f"memory-mapped: {gb(self.page_cache)} of page cache per node"
        ]
        batch = "auto" if w.batch_size == "auto" else w.batch_size
        terms = [f"evaluation {gb(w.evaluation)} (batch {batch} x {self.tasks.longest} tokens)", f"merge {gb(w.merge)}"]
        if s.refine:
            terms.append(f"refinement {gb(w.refinement)}")
        peak = f"resident {gb(w.resident)} ({m.dtype}) + max({', '.join(terms)})"
        who = "the worker (in this process)" if s.count == 0 else "each worker"
        cache = f" + SVD cache {gb(w.svd_cache)}" if w.svd_cache else ""
        if not self.on_gpu:
            out.append(f"plan: {who} on cpu: {peak} + runtime {gb(RUNTIME_HOST)}{cache} = {gb(w.host)}")
        else:
            k = max(1, int(s.num_gpus))
            where = f"{k} GPUs" if k > 1 else ("1 GPU" if s.num_gpus >= 1 else f"{s.num_gpus:g} of a GPU")
            per = " + ".join(gb(d) for d in w.per_device)
            out.append(
                f"plan: {who} on {where}: {peak} + CUDA {gb(CUDA_CONTEXT)}{' per GPU' if k > 1 else ''} = {per} "
                f"of GPU memory; host {gb(w.host)}"
            )
        out += self._subspace_memory_lines()
        out.append(self._node_line())
        if self.timing is not None:
            where = self.devices.where if len(self.devices.nodes) == 1 else f"{len(self.devices.nodes)} nodes"
            out += self.timing.lines(*self.night, workers=max(1, s.count), where=where)
        if self.export is not None:
            n, each, longest = self.export
            workers = max(1, s.count)
            wall = max(n * each / workers, longest)
            out.append(
                f"plan: export first validates at most {n} finalists (validation.top_k, the baselines, the portfolio's "
                f"default merges, every refinement point) at ~{each:.2f} s each"
                + (" on average" if longest > 1.5 * each else "")
                + f": ~{wall:.0f} s on {workers} worker(s), once (scores are kept in the study)"
                + ("; staged (validation.early_stop), clearly worse ones stop early" if self.staged_guard else "")
            )
        if self.left_out:
            said = ", ".join(f"{m} ~{t / 3600:.1f} h" if t >= 3600 else f"{m} ~{t:.0f} s" for m, t in self.left_out)
            out.append(
                f"plan: the portfolio leaves out {', '.join(m for m, _ in self.left_out)}: their default merges' SVDs "
                f"({said} on one CPU thread) take longer than the trials; name them in portfolio: [...] to score "
                "them anyway"
            )
        out += [f"plan: warning: {text}" for text in self.warnings]
        return out

    def _subspace_memory_lines(self) -> list[str]:
        """TSV-M's host memory: its SVD cache (kept from trial to trial) and its refinement surrogate."""
        w = self.worker
        cache = w.svd_cache or w.portfolio_cache
        if not cache and not w.surrogate:
            return []
        terms = []
        if cache:
            from evomerge.capacity.timing import subspace_work
            from evomerge.merge.kernels.subspace import SVD_CACHE_BYTES

            wanted = subspace_work(self.model, "tsv_m").wanted
            whose = "each worker's" if w.svd_cache else "one worker's, for the portfolio's TSV-M merge,"
            terms.append(
                f"{whose} SVD cache {gb(cache)} (float32 U, S, V^T of each weight matrix and model: {gb(wanted)}, "
                f"kept up to {gb(SVD_CACHE_BYTES)})"
            )
        if w.surrogate:
            where = "in its refinement term" if not self.on_gpu else "during a refinement round"
            terms.append(
                f"{where}, each worker's surrogate {gb(w.surrogate)} (a float32 copy of each weight matrix per model)"
            )
        return [f"plan: tsv_m in host memory: {'; '.join(terms)}"]

    def _node_line(self) -> str:
        node = self.devices.nodes[0]
        workers = max(1, self.settings.count)
        if not self.devices.local:
            workers = math.ceil(workers / len(self.devices.nodes))
        gpus = f"{node.gpus:g} GPU{'s' * (node.gpus != 1)}" if node.gpus else "no GPU"
        if node.gpu_free and len(set(node.gpu_free)) == 1:
            gpus += f" ({gb(node.gpu_free[0])} free each)"
        cpus = f"{node.cpus:g} CPUs" if node.cpus else "CPUs not given (--cpus)"
        have = f"{gb(node.host_available)} of {gb(node.host_total)} available, {cpus}, {gpus}"
        ray = f" + Ray {gb(RAY_NODE)} + driver {gb(RUNTIME_HOST)}" if self.settings.count > 0 else ""
        if self.worker.portfolio_cache:
            ray += f" + the portfolio's TSV-M SVD cache {gb(self.worker.portfolio_cache)}"
        need = self.node_bytes(workers, self.devices.local)
        verdict = "fits" if not self.problems else "does NOT fit"
        where = self.devices.where if len(self.devices.nodes) == 1 else f"each node of {self.devices.where}"
        return (
            f"plan: {where}: {have}; needs {workers} x {gb(self.worker.host)} + page cache {gb(self.page_cache)}"
            f"{ray} = {gb(need)} of host memory: {verdict}"
        )

    def check(self) -> None:
        if self.problems:
            raise ConfigError(f"{self.source}: {self.problems[0]}")


def plan_search(
    cfg: SearchConfig,
    scorer=None,
    devices: Devices | None = None,
    model: ModelFacts | None = None,
    gpu_kind: str | None = None,
    tokenizer: str | None = None,
) -> Plan:
    """The plan of `cfg` (refinement counted when `cfg.refine` is set) on `devices` (default: this machine, or the
    Ray cluster of `workers.address` when this process has joined it). `scorer`: the search tasks, built already
    (else built here). `model`: the inputs' facts when they come from a config.json alone (`audit --plan
    --model-config`, whose `tokenizer` folder counts the tasks' tokens, or None: about 4 characters a token);
    `gpu_kind`: the GPUs' kind the time plan assumes (default: this machine's, else an H100)."""
    if scorer is None:
        from evomerge.scoring.scorer import Scorer

        scorer = Scorer(
            cfg.tasks.search,
            [str(p) for p in cfg.tasks.include_paths],
            seed=cfg.seed,
            include_defaults=cfg.tasks.include_defaults,
        )
    if model is None:
        model, tokenizer = ModelFacts.of_inputs(cfg.base_model, cfg.models, dtype=cfg.dtype), str(cfg.base_model)
    tasks = TaskFacts.of_scorer(scorer, tokenizer)
    plan = _plan_of(cfg, model, tasks, devices, gpu_kind, tokenizer)
    if plan.left_out:  # the night without them: the memory (TSV-M's cache) and the time lines
        kept = [m for m in portfolio_methods(cfg) if m not in dict(plan.left_out)]
        left_out, plan = (
            plan.left_out,
            _plan_of(cfg.model_copy(update={"portfolio": kept}), model, tasks, devices, gpu_kind, tokenizer),
        )
        plan.left_out = left_out
    return plan


def _plan_of(
    cfg: SearchConfig, model: ModelFacts, tasks: TaskFacts, devices: Devices | None, gpu_kind, tokenizer
) -> Plan:
    settings = Settings(
        count=cfg.workers.count,
        num_gpus=cfg.workers.num_gpus,
        num_cpus=cfg.workers.num_cpus,
        refine=cfg.refine is not None,
        method=cfg.method,
        row_ties=cfg.method == "ties" and bool(cfg.refine and cfg.refine.arms_run(cfg.budget.n_trials) - {"tensor"}),
        batch_size=cfg.workers.batch_size,
        portfolio=portfolio_methods(cfg),
    )
    plan = evaluate_plan(model, tasks, settings, devices or local_devices(), source=cfg._source)
    return with_timing(plan, cfg, gpu_kind, tokenizer)


def with_timing(plan: Plan, cfg: SearchConfig, gpu_kind: str | None = None, tokenizer: str | None = None) -> Plan:
    """The plan with its time lines: seconds per trial by part on the planned devices, trials per hour, the end,
    and the export's validation (`tokenizer` counts the validation tasks' tokens, as `plan_search`'s)."""
    from evomerge.capacity.timing import SUBSPACE_METHODS, cpu_speed, gpu_speed, local_gpu_kind, trial_time

    s, n = plan.settings, cfg.budget.n_trials
    if plan.on_gpu and plan.devices.gpus:
        kind = gpu_kind or (local_gpu_kind() if plan.devices.where == "this machine" else None)
        batch = plan.worker.batch_size if isinstance(plan.worker.batch_size, int) else 64
        speed = gpu_speed(kind, s.num_gpus, batch=batch)
    else:
        speed = cpu_speed(s.num_cpus, "this machine" if plan.devices.local else "the given machine")
    rounds, steps = (len(cfg.refine.starts(n)), cfg.refine.schedule(n)[0]) if cfg.refine is not None else (0, 0)
    methods = portfolio_methods(cfg)
    plan.timing = trial_time(
        plan.model, refined_tasks(plan, cfg), speed, n, rounds, steps, method=cfg.method, portfolio=methods
    )
    portfolio = len(methods)
    plan.night = (n, portfolio)
    workers = max(1, s.count)
    trials_s = plan.timing.night(n, 0, workers)
    if plan.timing.portfolio_s(portfolio, workers) > max(trials_s, 3600):
        slow = [m for m, _ in plan.timing.portfolio if m in SUBSPACE_METHODS]
        if cfg.portfolio is True:  # the default: every default merge that costs less than the search itself
            plan.left_out = tuple((m, t) for m, t in plan.timing.portfolio if m in SUBSPACE_METHODS)
        else:
            plan.warnings.append(
                f"the portfolio's default merges ({', '.join(slow)}: SVDs on one CPU thread) take longer than the "
                f"{n} trials; leave them out of portfolio: [...], or budget the time"
            )
    if cfg.validation is not None:
        plan.export = _export_time(plan, cfg, speed, methods, tokenizer)
        plan.staged_guard = bool(cfg.validation and cfg.validation.early_stop and cfg.early_stop is not None)
    return plan


def refined_tasks(plan: Plan, cfg: SearchConfig) -> TaskFacts:
    """The tasks with the refinement batch a step trains on: `refine.examples` per task where set, else the
    workers' rule at this model's size (refine/footprint.py `examples_per_task`); the batch's tokens shrink with it."""
    if cfg.refine is None:
        return plan.tasks
    return refine_batch(plan.model, plan.tasks, cfg.refine.examples)


def refine_batch(model: ModelFacts, tasks: TaskFacts, examples: int | None = None) -> TaskFacts:
    """`tasks` with the refinement batch a step trains on: `examples` per task, else the workers' rule at this
    model's size (refine/footprint.py `examples_per_task`); the batch's tokens shrink with it."""
    from dataclasses import replace

    from evomerge.refine.footprint import examples_per_task

    if not tasks.largest_subset:
        return tasks
    examples = examples or examples_per_task(model.params, tasks.refine_positions, tasks.largest_subset)
    share = min(1.0, examples / tasks.largest_subset) if examples else 1.0
    return replace(
        tasks, refine_tokens=round(tasks.refine_tokens * share), refine_shared=round(tasks.refine_shared * share)
    )


def _export_time(
    plan: Plan, cfg: SearchConfig, speed, portfolio: tuple[str, ...], tokenizer: str | None
) -> tuple[int, float, float]:
    """(finalists, mean seconds each, the longest) of the guard `evomerge export` runs first: at most top_k trials,
    the baselines (the default merge, each source alone), the portfolio's default merges (each by its own method)
    and every refinement point, each merged and scored on the validation tasks (a finalist scored before is not
    scored again)."""
    from evomerge.capacity.schedule import Schedule
    from evomerge.capacity.timing import evaluation_s, merge_s, subspace_s
    from evomerge.scoring.scorer import Scorer

    scorer = Scorer(
        cfg.validation.tasks,
        [str(p) for p in cfg.tasks.include_paths],
        seed=cfg.seed,
        include_defaults=cfg.tasks.include_defaults,
    )
    tasks = TaskFacts.of_scorer(scorer, tokenizer)
    schedule = Schedule.of(cfg, n_baselines=len(cfg.models) + 1, n_portfolio=len(portfolio))
    searched = cfg.validation.top_k + schedule.baselines + schedule.points_per_round * len(schedule.starts)
    evaluation = evaluation_s(plan.model, tasks, speed)
    own = merge_s(plan.model, speed, cfg.method) + evaluation
    others = [merge_s(plan.model, speed, m) + subspace_s(plan.model, speed, m)[1] + evaluation for m in portfolio]
    finalists = searched + len(portfolio)
    return finalists, (searched * own + sum(others)) / max(1, finalists), max([own, *others])


def evaluate_plan(
    model: ModelFacts, tasks: TaskFacts, settings: Settings, devices: Devices, source: str = "search config"
) -> Plan:
    """The plan of given facts and settings on `devices` (the projections call it with shapes of their own)."""
    free = _smallest_gpu(devices)
    worker = worker_memory(model, tasks, settings, free)
    plan = Plan(model, tasks, settings, worker, devices, source=source)
    plan.problems += _gpu_problems(plan, free) + _host_problems(plan)
    if settings.num_gpus == 0 and devices.gpus > 0:
        plan.warnings.append(
            f"workers.num_gpus is 0: the workers run on CPU and leave the {devices.gpus:g} GPU(s) of {devices.where} "
            "idle; set workers.num_gpus: 1 (a worker per GPU) to plan them"
        )
    return plan


def _smallest_gpu(devices: Devices) -> int | None:
    frees = [f for n in devices.nodes if n.gpus for f in n.gpu_free]
    return min(frees) if frees else None


def _gpu_problems(plan: Plan, free: int | None) -> list[str]:
    s, d = plan.settings, plan.devices
    if s.num_gpus <= 0:
        return []
    if d.gpus == 0:
        why = f" ({d.no_gpu_reason})" if d.no_gpu_reason else ""
        return [
            f"workers.num_gpus: {s.num_gpus:g} GPU(s) per worker, but {d.where} has no GPU{why}; "
            "set workers.num_gpus: 0 to run the workers on CPU"
        ]
    if s.num_gpus > 1 and s.num_gpus != int(s.num_gpus):
        return [f"workers.num_gpus: {s.num_gpus:g}: a worker on several GPUs takes whole GPUs; write 2, 4 or 8"]
    workers = max(1, s.count)
    fit = sum(math.floor(n.gpus / s.num_gpus + 1e-9) for n in d.nodes)
    if fit < workers:
        biggest = max(n.gpus for n in d.nodes)
        if s.num_gpus > biggest:
            return [
                f"workers.num_gpus: {s.num_gpus:g} GPUs per worker, but the largest node of {d.where} has "
                f"{biggest:g}; a worker's GPUs are on one node: set workers.num_gpus to at most {biggest:g}"
            ]
        return [
            f"workers.count: {workers} workers x {s.num_gpus:g} GPU(s) need {workers * s.num_gpus:g} GPUs, but "
            f"{d.where} has {d.gpus:g}; set workers.count to at most {fit}"
        ]
    if free is None:
        return []
    return _gpu_memory_problem(plan, free)


def _gpu_memory_problem(plan: Plan, free: int) -> list[str]:
    """Whether one worker's share fits each of its GPUs; else the setting that would make it fit: more GPUs per
    worker when some number of them holds it, else refine (when the round is what does not fit), dtype, the batch."""
    s, w, m = plan.settings, plan.worker, plan.model
    sharing = max(1, math.floor(1 / s.num_gpus + 1e-9)) if s.num_gpus < 1 else 1
    room = int(free * DEVICE_SHARE)
    need = max(w.per_device) * sharing
    if need <= room:
        return []
    k = max(1, int(s.num_gpus))
    have = f"{gb(need)} per GPU, more than the {gb(room)} usable of {gb(free)} free"
    if sharing > 1:
        return [f"workers.num_gpus: {sharing} workers share a GPU and need {have}; set workers.num_gpus: 1"]
    most = int(max(n.gpus for n in plan.devices.nodes))
    what = f"the resident model ({gb(m.resident_bytes)}, {m.dtype}) with {_biggest(w)} on {k} GPU(s) needs {have}"
    better = _fewest_gpus(plan, free, most)
    if better:
        per_node = f" (then {most // better} worker(s) per {most}-GPU node)" if most // better < max(1, s.count) else ""
        return [f"workers.num_gpus: {what}; set workers.num_gpus: {better}{per_node}"]
    if s.refine and w.refinement >= max(w.evaluation, w.merge):
        without = _fewest_gpus(plan, free, most, refine=False, start=k)
        where = f" (a worker then fits {without} GPU(s))" if without else ""
        return [f"refine: {what}, and no node has enough GPUs for the round; set refine: null{where}"]
    if m.dtype == "float32":
        return [f"dtype: {what}; set dtype: bfloat16 (half the bytes)"]
    if isinstance(s.batch_size, int) and w.evaluation >= max(w.merge, w.refinement):
        return [f"workers.batch_size: {what}; lower workers.batch_size or leave it out (the plan sizes it)"]
    return [f"workers.num_gpus: {what}, and no node of {plan.devices.where} has enough GPUs ({most}) for it"]


def _biggest(w: WorkerMemory) -> str:
    terms = [("evaluation", w.evaluation), ("merge buffers", w.merge), ("refinement", w.refinement)]
    name, size = max(terms, key=lambda term: term[1])
    return f"its {name} ({gb(size)})"


def _fewest_gpus(plan: Plan, free: int, most: int, refine: bool | None = None, start: int = 0) -> int | None:
    """The fewest whole GPUs per worker (2, 4, 8 ... or a whole node; more than it has, or from `start`) on which
    this worker fits, with refinement as configured or as `refine` says; None when no node has that many."""
    first = start or max(1, int(plan.settings.num_gpus)) + 1
    # groups of 2, 4, 8 ... (and a whole node): what divides a node into workers without idle GPUs
    sizes = sorted({2**j for j in range(1, most.bit_length() + 1) if 2**j <= most} | {most})
    for k in (k for k in sizes if k >= first):
        changes = {"num_gpus": float(k)} | ({} if refine is None else {"refine": refine})
        settings = Settings(**{**plan.settings.__dict__, **changes})
        w = worker_memory(plan.model, plan.tasks, settings, free)
        if max(w.per_device) <= int(free * DEVICE_SHARE):
            return k
    return None


def _host_problems(plan: Plan) -> list[str]:
    s, w, m, d = plan.settings, plan.worker, plan.model, plan.devices
    nodes = d.nodes
    first_free = nodes[0].host_available - (plan.node_bytes(0, d.local) - plan.page_cache)
    if w.host > first_free:  # not even one worker
        base = f"one worker needs {gb(w.host)} of host memory, but {d.where} has {gb(first_free)} free for it"
        if not plan.on_gpu and m.dtype == "float32":
            return [f"dtype: {base}; set dtype: bfloat16 (half the resident model)"]
        if not plan.on_gpu and s.refine and w.refinement >= max(w.evaluation, w.merge):
            return [f"refine: {base}, {gb(w.refinement)} of it for a refinement round; set refine: null"]
        if isinstance(s.batch_size, int) and w.evaluation >= max(w.merge, w.refinement):
            return [f"workers.batch_size: {base}, {gb(w.evaluation)} of it for a batch of {s.batch_size}; lower it"]
        gpus = " or on GPUs (workers.num_gpus)" if not plan.on_gpu else ""
        return [f"workers: {base}; run the search on a machine with more memory{gpus}"]
    fit = fit_memory = 0
    for i, node in enumerate(nodes):
        room = node.host_available - (plan.node_bytes(0, d.local and i == 0) - plan.page_cache)
        by_memory = max(0, room // max(w.host, 1))
        by_cpu = math.floor(node.cpus / s.num_cpus + 1e-9) if d.cpu_bound else by_memory
        fit += min(by_memory, by_cpu)
        fit_memory += by_memory
    workers = max(1, s.count)
    problems = []
    if s.count > 0 and fit < workers and fit_memory >= workers:  # the CPUs, not the memory
        have = sum(n.cpus for n in nodes)
        problems.append(
            f"workers.count: {workers} workers x {s.num_cpus:g} CPUs (workers.num_cpus) need "
            f"{workers * s.num_cpus:g} CPUs, but {d.where} has {have:g}; set workers.count to at most {max(fit, 1)} "
            "or lower workers.num_cpus"
        )
    elif s.count > 0 and fit < workers:
        problems.append(
            f"workers.count: {workers} workers need {gb(workers * w.host)} of host memory ({gb(w.host)} each), "
            f"but {d.where} has room for {fit}; set workers.count to at most {max(fit, 1)}"
        )
    per_node = math.ceil(workers / len(nodes))
    if not problems and plan.node_bytes(per_node, d.local) > min(n.host_total for n in nodes):
        plan.warnings.append(
            f"the inputs' {gb(plan.page_cache)} do not stay in the page cache beside the workers: each merge reads "
            "them from disk again (slow, but it runs)"
        )
    return problems


__all__ = [
    "Plan",
    "evaluate_plan",
    "plan_search",
    "refine_batch",
    "refined_tasks",
]
