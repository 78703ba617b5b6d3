"""Where a search trial's seconds go, part by part: merge, evaluation (per task), refinement step, overhead.

    .venv/bin/python bench/trial_cost.py --base zoos/smol/base --models zoos/smol/code zoos/smol/stutter \\
        --tasks smol_code_search smol_stutter_search smol_parity_search --include-path eval_tasks/smol
    .venv/bin/python bench/trial_cost.py --tiny          # the tiny zoo (built in a temp dir) and its greedy tasks

It builds the search's own parts as a search config with the shipped defaults would (task arithmetic over the
shipped space, 100-example search subsets, CPU worker with `--threads` torch threads) and times each, in-process
(no Ray: `--ray` adds a Ray actor's start and one job's round trip):
  overhead     the tasks built and the inputs loaded once per worker; an Optuna ask + tell on SQLite per trial
  merge        one candidate materialized into the resident model (the median over --repeats)
  evaluation   per task, one whole subset scored: requests, prompt tokens, generated tokens, forward passes and
               seconds; then a sampled trial's staged evaluation (first stage, or the whole subset)
  refinement   a round's setup (the training items), one Adam step's parts: the surrogate written into the model,
               forward + backward per micro-batch, the inner products (dL/d slot); the per-row step likewise
and prints seconds per part, then a 100-trial search projected from them with the shipped schedule (the
portfolio and baselines, sampled trials with staged evaluation, half of them stopped at the first stage, 4
refinement rounds of 60 steps and their points, the guard's validation scoring). `--compare` scores each generation
task twice, with the stop at the task's max_gen_toks (lm-eval's own) and at the longest reference answer (what a
search does), side by side, and checks the scores agree. `--refine-examples subset` times the refinement on the
whole search subsets (before footprint.refine_examples), `auto` as a search's worker runs it.

Seconds are this process's CPU seconds (`--clock wall` for wall seconds): on a shared machine they are about what
the same work takes on one idle core (run with `--threads 1`, the default), an upper bound for two.
Figures go to stdout; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def clock() -> float:
    """The bench's clock: this process's CPU seconds (`--clock cpu`, the default: on a shared machine, about the
    wall seconds the same work takes on an idle core with --threads 1), or wall seconds (`--clock wall`)."""
    return CLOCK[0]()


CLOCK = [time.process_time]


def _counter(model) -> dict[str, float]:
    """Wrap model.forward: calls, positions fed (rows x width) and seconds inside the forward passes."""
    stats = {"calls": 0, "positions": 0, "seconds": 0.0}
    inner = model.forward

    def counted(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        start = clock()
        out = inner(*args, **kwargs)
        stats["seconds"] += clock() - start
        stats["calls"] += 1
        stats["positions"] += int(ids.numel()) if ids is not None else 0
        return out

    model.forward = counted
    return stats


def _config(args, tmp: Path):
    from evomerge.config.schema import load_config

    named = [t.split(":", 1) if ":" in t else (t, args.metric) for t in args.tasks]  # NAME[:METRIC]
    tasks = "\n".join(f"    - {{name: {t}, metric: {m}, subset: {args.subset}}}" for t, m in named)
    paths = ", ".join(str(Path(p).resolve()) for p in args.include_path)
    text = (
        f"name: trialcost\nbase_model: {Path(args.base).resolve()}\n"
        f"models: [{', '.join(str(Path(m).resolve()) for m in args.models)}]\nmethod: {args.method}\n"
        f"search_space: {args.method}\ntasks:\n  include_paths: [{paths}]\n  search:\n{tasks}\n"
        f"storage: sqlite:///{tmp / 'study.db'}\nworkers: {{count: 0, num_cpus: {args.threads}}}\n"
    )
    (tmp / "config.yaml").write_text(text)
    return load_config(tmp / "config.yaml")


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def measure_overhead(cfg, tmp: Path) -> tuple[dict[str, float], object]:
    from evomerge.candidate.evaluator import Evaluator
    from evomerge.scoring import Scorer

    out = {}
    start = clock()
    Scorer(cfg.tasks.search, cfg.tasks.include_paths, seed=cfg.seed)
    out["tasks built (once per worker)"] = clock() - start
    start = clock()
    ev = Evaluator.for_config(cfg, {"search": cfg.tasks.search})
    out["worker setup: tasks + inputs + model (once)"] = clock() - start
    out["optuna ask + tell (per trial)"] = _optuna_s(cfg, tmp)
    return out, ev


def _optuna_s(cfg, tmp: Path, n: int = 10) -> float:
    import optuna

    from evomerge.candidate.space import space_of
    from evomerge.study.storage import get_storage
    from evomerge.study.study import ask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_of(cfg)
    dists = {k: optuna.distributions.FloatDistribution(p.low, p.high) for k, p in space.bounds(cfg.models).items()}
    storage = get_storage(f"sqlite:///{tmp / 'optuna.db'}")  # the search's own (WAL, synchronous=NORMAL)
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.CmaEsSampler(seed=0))
    start = clock()
    for i in range(n):
        trial = ask(study, dists)
        study.tell(trial, float(i % 3))
    return (clock() - start) / n


def measure_ray() -> dict[str, float]:
    import ray  # wall seconds: Ray's work happens in other processes

    start = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Echo:
        def run(self, x):
            return x

    actor = Echo.remote()
    ray.get(actor.run.remote(0))
    started = time.perf_counter() - start
    trip = _timed(lambda: ray.get(actor.run.remote("x" * 20000)), 20)
    ray.shutdown()
    return {"ray start + actor (once)": started, "ray job round trip (per trial)": trip}


def sample_recipe(cfg, seed: int):
    """A point drawn uniformly from the search space, as a recipe (what a sampled trial merges)."""
    import random

    from evomerge.candidate.space import space_of

    space = space_of(cfg)
    rng = random.Random(seed)
    point = {k: rng.uniform(p.low, p.high) for k, p in space.bounds(cfg.models).items()}
    recipe = space.to_recipe(point, cfg.models, cfg.base_model, cfg.method, cfg.seed, cfg.dtype)
    return point, recipe


def measure_merge(ev, cfg, repeats: int) -> float:
    recipes = [sample_recipe(cfg, i)[1] for i in range(repeats)]
    times = []
    for recipe in recipes:
        start = clock()
        ev.load(recipe)
        times.append(clock() - start)
    return statistics.median(times[1:] or times)  # the first reads the inputs' pages from disk


def _task_tokens(scorer, leaf: str, tokenizer) -> tuple[int, int]:
    """(requests, prompt tokens) of one leaf's subset, as lm-eval builds its requests."""
    task = scorer.tasks[leaf]
    docs = task.eval_docs
    n = tokens = 0
    for i in scorer.indices(leaf):
        ctx = task.fewshot_context(docs[i], num_fewshot=task.get_config("num_fewshot") or 0)
        tokens += len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
        n += 1
    return n, tokens


def _generated_tokens(scorer, model, tokenizer, leaf: str) -> tuple[float, dict]:
    """(exact-match score, per-example responses) of one leaf scored alone; counts the generated tokens."""
    out = scorer._evaluate(model, tokenizer, {leaf: scorer.indices(leaf)}, log_samples=True, leaves=[leaf])
    rows = out["samples"][leaf]
    return out["results"][leaf], {int(r["doc_id"]): r["filtered_resps"] for r in rows}


def measure_eval(ev, scorer) -> dict[str, dict]:
    """Per search task: requests, prompt and generated tokens, forward passes, seconds for its whole subset."""
    model, tok = ev.model, ev.tokenizer
    stats = _counter(model)
    out = {}
    for leaf in scorer.tasks:
        requests, prompt_tokens = _task_tokens(scorer, leaf, tok)
        before = dict(stats)
        start = clock()
        scores, responses = _generated_tokens(scorer, model, tok, leaf)
        seconds = clock() - start
        gen = sum(len(tok(str(r[0]), add_special_tokens=False)["input_ids"]) for r in responses.values() if r)
        out[leaf] = {
            "requests": requests,
            "prompt tokens": prompt_tokens,
            "generated tokens": gen if scorer.tasks[leaf].OUTPUT_TYPE == "generate_until" else 0,
            "forward passes": stats["calls"] - before["calls"],
            "positions": stats["positions"] - before["positions"],
            "forward s": stats["seconds"] - before["seconds"],
            "seconds": seconds,
            "scores": scores,
            "responses": responses,
        }
    model.forward = type(model).forward.__get__(model)
    return out


def measure_staged(ev, cfg, repeats: int) -> dict[str, float]:
    """A sampled trial's evaluation: the whole subset (a baseline or refine point), and staged against an
    incumbent it is clearly worse than (first stage only) or level with (every stage)."""
    whole, stopped, level = [], [], []

    def run(recipe, **kwargs):
        ev.load(recipe)
        start = clock()
        res = ev.evaluate_examples(recipe, "search", seed=cfg.seed, **kwargs)
        return res, clock() - start

    for i in range(repeats):
        _, recipe = sample_recipe(cfg, 100 + i)
        res, seconds = run(recipe)
        whole.append(seconds)
        ones = {leaf: dict.fromkeys(u, 1.0) for leaf, u in res.examples.items()}
        first, seconds = run(recipe, stages=(0.2, 0.5), incumbent=ones, incumbent_objective=1.0)
        stopped.append(seconds if first.stopped else float("nan"))
        _, seconds = run(recipe, stages=(0.2, 0.5), incumbent=res.examples, incumbent_objective=1.0)
        level.append(seconds)
    return {
        "whole subsets (baselines, refine points)": statistics.median(whole),
        "staged, stopped after stage 1 (20%)": statistics.median(stopped),
        "staged, every stage (level with the best)": statistics.median(level),
    }


def measure_refine(ev, cfg, arm: str, steps: int, examples: str) -> dict[str, float]:
    """A refinement round's setup and one step's parts, timed by wrapping the refiner's own methods. `examples`:
    "auto" (what a search's worker uses: footprint.refine_examples), "subset" (the search subsets), or a number."""
    from evomerge.candidate.space import space_of
    from evomerge.refine.footprint import refine_examples

    point, _ = sample_recipe(cfg, 7)
    args = (ev.materializer, ev.scorer("search"), space_of(cfg), cfg.models, cfg.base_model, cfg.method)
    per_task = {"auto": lambda: refine_examples(ev.materializer, ev.scorer("search")), "subset": lambda: None}
    n = per_task.get(examples, lambda: int(examples))()
    start = clock()
    if arm == "tensor":
        from evomerge.refine.tensor import Refiner

        refiner = Refiner(*args, n, seed=cfg.seed, dtype=cfg.dtype)
        batches = refiner.batches()
        parts = {"write": "_write", "forward+backward": "_backward", "dL/dslot": "_slot_grad", "prepare": "prepare"}
    else:
        from evomerge.refine.rows import RowRefiner

        refiner = RowRefiner(*args, loss="distill" if arm == "distill" else "likelihood", examples=n, seed=cfg.seed)
        batches = refiner.batches
        parts = {"write": "_write", "forward+backward": "_backward", "dL/dslot": "_grads", "prepare": "_rows"}
    setup = clock() - start
    spent = dict.fromkeys(parts, 0.0)
    for label, name in parts.items():
        inner = getattr(refiner, name)

        def timed(*a, _inner=inner, _label=label, **k):
            t = clock()
            try:
                return _inner(*a, **k)
            finally:
                spent[_label] += clock() - t

        setattr(refiner, name, timed)
    start = clock()
    refiner.run(point, steps=steps, every=steps)
    total = clock() - start
    rows = sum(b.rows for b in batches)
    positions = sum(int(b.ids.numel()) for b in batches)
    out = {"examples per task (None: the search subsets)": str(n)}
    out["setup (items; distill: sources scored, owners' answers)"] = setup
    out.update({f"per step: {k}": v / (steps + (k == "forward+backward")) for k, v in spent.items() if k != "prepare"})
    out["per step: total"] = (total - spent["prepare"]) / steps
    out["prepare (once per round)"] = spent["prepare"]
    out["micro-batches / rows / positions per step"] = f"{len(batches)} / {rows} / {positions}"
    return out


def compare_eval(ev, cfg, compare: bool) -> None:
    """Each search task scored whole; with `compare` first with lm-eval's own bound on the generated tokens (the
    task's max_gen_toks), then cut at the longest reference answer, checking every example scores the same."""
    from evomerge.scoring import Scorer

    runs = {"cut at the answer": ev.scorer("search")}
    if compare:
        full = Scorer(cfg.tasks.search, cfg.tasks.include_paths, seed=cfg.seed, answer_cap=False)
        runs = {"task's max_gen_toks": full, **runs}
    results = {label: measure_eval(ev, scorer) for label, scorer in runs.items()}
    for leaf in runs["cut at the answer"].tasks:
        for label, rows in results.items():
            row = rows[leaf]
            bound = runs[label].tasks[leaf].get_config("generation_kwargs") or {}
            table = {k: v for k, v in row.items() if k != "responses"}
            table["max_gen_toks"] = bound.get("max_gen_toks", "-")
            _print(f"evaluation: {leaf}, whole subset, {label}", table)
        if compare:
            a, b = (results[label][leaf]["responses"] for label in runs)
            same = results["task's max_gen_toks"][leaf]["scores"] == results["cut at the answer"][leaf]["scores"]
            print(f"  same scores: {same}; responses that differ (cut text): {sum(a[i] != b[i] for i in a)}")


def _print(title: str, table: dict) -> None:
    print(f"\n{title}")
    for k, v in table.items():
        print(f"  {k:58s} {v:10.3f}" if isinstance(v, float) else f"  {k:58s} {v}")


def project(
    cfg, overhead: dict, merge_s: float, staged: dict, refine: dict[str, dict], n_trials: int = 100
) -> dict[str, float]:
    """A 100-trial search from the parts: the shipped defaults' schedule (config.RefineConfig, EarlyStopConfig)."""
    from evomerge.candidate.portfolio import default_merges
    from evomerge.config.schema import RefineConfig

    rc = RefineConfig()
    steps, every = rc.schedule(n_trials)
    rounds = len(rc.starts(n_trials))
    points = rounds * (steps // every)
    portfolio = len(default_merges(cfg)[0])
    sampled = n_trials - points  # baselines and sampled trials (the portfolio comes on top)
    trial = (
        staged["staged, stopped after stage 1 (20%)"] * 0.5 + staged["staged, every stage (level with the best)"] * 0.5
    )
    per_trial_overhead = overhead["optuna ask + tell (per trial)"]
    out = {
        "worker setup": overhead["worker setup: tasks + inputs + model (once)"],
        f"portfolio ({portfolio} default merges, whole subsets)": portfolio
        * (merge_s + staged["whole subsets (baselines, refine points)"]),
        f"{sampled} sampled + baseline trials (half stop at stage 1)": sampled * (merge_s + trial + per_trial_overhead),
        f"{points} refinement points (whole subsets)": points
        * (merge_s + staged["whole subsets (baselines, refine points)"]),
    }
    for r in range(rounds):
        arm = rc.arm(r)
        part = refine.get(arm) or refine.get("tensor")
        out[f"round {r} ({arm}): setup + {steps} steps"] = (
            part["setup (items; distill: sources scored, owners' answers)"]
            + part["prepare (once per round)"]
            + steps * part["per step: total"]
        )
    guard = 3 + 1 + len(cfg.models) + 1  # top_k (3) and the baselines: the default merge, each source, the base
    out[f"guard: {guard} merges on validation splits (as large as the subsets)"] = guard * (
        merge_s + staged["whole subsets (baselines, refine points)"]
    )
    out["total (s)"] = sum(out.values())
    out["total (min)"] = out["total (s)"] / 60
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--tasks", nargs="+", help="search tasks, NAME or NAME:METRIC (default metric: --metric)")
    parser.add_argument("--include-path", nargs="*", default=[])
    parser.add_argument("--tiny", action="store_true", help="the tiny zoo (built in a temp dir) and its greedy tasks")
    parser.add_argument("--metric", default="exact_match")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--subset", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="refinement steps timed per arm")
    parser.add_argument("--arms", nargs="*", default=["tensor", "rows", "distill"])
    parser.add_argument("--refine-examples", default="auto", help="auto (a search's default), subset, or N per task")
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--compare", action="store_true", help="evaluation with and without the answer cut")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: eval staged refine")
    args = parser.parse_args(argv)

    from evomerge.offline import go_offline

    go_offline()
    import torch

    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    tmp = Path(tempfile.mkdtemp(prefix="trialcost-"))
    if args.tiny:
        from evomerge.zoo.build import build_zoo

        zoo = tmp / "zoo"
        build_zoo(zoo, size="tiny", log=None)
        args.base, args.models = str(zoo / "base"), [str(zoo / "add"), str(zoo / "reverse")]
        args.tasks = args.tasks or ["zoo_add_greedy_search", "zoo_reverse_greedy_search"]
        args.metric = "acc"
    if not (args.base and args.models and args.tasks):
        parser.error("give --base, --models and --tasks (or --tiny)")
    cfg = _config(args, tmp)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {stamp}, torch threads {args.threads}, {args.clock} seconds, {sys.argv[1:]}")
    overhead, ev = measure_overhead(cfg, tmp)
    if args.ray:
        overhead.update(measure_ray())
    _print("overhead (s)", overhead)
    merge_s = measure_merge(ev, cfg, args.repeats)
    _print("merge (s, median)", {"materialize one candidate": merge_s})
    if "eval" not in args.skip:
        compare_eval(ev, cfg, args.compare)
    staged = {}
    if "staged" not in args.skip:
        staged = measure_staged(ev, cfg, args.repeats)
        _print("evaluation of a trial (s, median)", staged)
    refine = {}
    if "refine" not in args.skip:
        for arm in args.arms:
            refine[arm] = measure_refine(ev, cfg, arm, args.steps, args.refine_examples)
            _print(f"refinement, {arm} arm (s)", refine[arm])
    if staged and refine:
        _print("projected 100-trial search, shipped defaults (s)", project(cfg, overhead, merge_s, staged, refine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
