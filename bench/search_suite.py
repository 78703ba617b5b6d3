"""Search quality over the zoo family: does a search with the shipped defaults beat every default merge and every
single source, and what share of the room to the routing oracle does it capture, on held-out data?

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_suite.py                  # bench/search_quality.md (2 h, 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_suite.py --variants pair --seeds 0 --budgets 25   # a quick look
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_suite.py --variants smol --seeds 0 --budgets 25   # the real member
    OMP_NUM_THREADS=1 .venv/bin/python bench/search_suite.py --set '{"refine": false}' --label no-refine

For each zoo variant (built once into --zoo-dir) it scores on the held-out splits: every source model, the default
merge of every method that applies (candidate/portfolio.py), and the routing oracle (each task answered by its best
source). The floor is max(best default merge, best single source); the room is the oracle minus the floor. Then for
each sampler seed and budget it runs a search as a new user would configure it (the config below: `method`, greedy
exact-match search tasks on 100-example subsets, the validation splits for the overfitting guard, every other
setting at its default, `--set` to override; seed s is the sampler's seed and the search subsets' seed), takes the
trial `evomerge export` would take, and scores it on the held-out splits. Printed per variant and budget, and
averaged: the margin over the floor (points), the share of the room captured, how many runs fall below the floor by
more than their standard error, search seconds and examples scored. One JSON line per run goes to --log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("pair", "trio", "quad", "steep", "plain", "deep", "qwen")  # the family (bench/zoo_family.md)
REAL_VARIANTS = ("smol",)  # the real member (--variants smol; the extra evomerge[real]): SmolLM2-135M-Instruct


def zoo_path(zoo_dir: Path, variant: str) -> Path:
    return zoo_dir / f"{variant}-z0"


def suite_tasks(variant: str, skills: list[str]) -> tuple[list[dict], list[str], list[dict]]:
    """(search, held-out, validation) tasks: the toy zoos' greedy exact-match tasks; the real member's (smol) own
    tasks, exact match of a generated answer or multiple choice (eval_tasks/smol/)."""
    if variant in REAL_VARIANTS:
        from evomerge.zoo.real_skills import REAL_SKILLS

        metric = {s: "exact_match" if REAL_SKILLS[s].kind == "generate" else "acc" for s in skills}
        return (
            [{"name": f"smol_{s}_search", "metric": metric[s], "subset": 100} for s in skills],
            [f"smol_{s}" for s in skills],
            [{"name": f"smol_{s}_val", "metric": metric[s]} for s in skills],
        )
    return (
        [{"name": f"zoo_{s}_greedy_search", "metric": "acc", "subset": 100} for s in skills],
        [f"zoo_{s}_greedy" for s in skills],
        [{"name": f"zoo_{s}_greedy_val", "metric": "acc"} for s in skills],
    )


def config_for(zoo: Path, method: str, budget: int, seed: int, overrides: dict) -> dict:
    """The search config a new user would write for this zoo: tasks, validation, budget; the rest at defaults."""
    manifest = json.loads((zoo / "zoo.json").read_text())
    skills = list(manifest["specialists"])
    search, heldout, validation = suite_tasks(manifest.get("variant", ""), skills)
    cfg = {
        "name": "suite",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / s) for s in skills],
        "method": method,
        "tasks": {"search": search, "heldout": heldout},
        "validation": {"tasks": validation},
        "budget": {"n_trials": budget},
        "sampler": {"seed": seed},
        "seed": seed,  # the search subsets' seed too: each run samples other search examples
        "workers": {"count": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def _quiet() -> None:
    from evomerge.offline import go_offline

    go_offline()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def heldout_scorer(cfg):
    from evomerge.candidate.evaluator import Evaluator
    from evomerge.report.compare import heldout_metric
    from evomerge.scoring.tasks import TaskSpec

    return Evaluator(
        cfg.models,
        cfg.base_model,
        {"heldout": [TaskSpec(name=t, metric=heldout_metric(t, cfg.tasks.search)) for t in cfg.tasks.heldout]},
        cfg.tasks.include_paths,
        seed=cfg.seed,
        dtype=cfg.dtype,
    )


def baselines(zoo: Path, method: str) -> dict:
    """Held-out scores (points) of the sources, every default merge and the oracle; the floor and the room."""
    from evomerge.candidate.portfolio import default_merges
    from evomerge.config.schema import parse_config

    cache = zoo / f"baselines-{method}.json"
    manifest = json.loads((zoo / "zoo.json").read_text())
    cfg = parse_config(config_for(zoo, method, 1, 0, {}))
    merges = default_merges(cfg)[0]
    if cache.is_file():  # valid for these models and every default merge the portfolio has now
        data = json.loads(cache.read_text())
        known = data["rows"].keys() | data.get("failed", {}).keys()
        if data.get("sha256") == manifest["sha256"] and {str(label) for label, _ in merges} <= known:
            return data
    _quiet()
    from evomerge.candidate.evaluator import alone
    from evomerge.errors import EvomergeError, first_line

    ev = heldout_scorer(cfg)
    rows = {}
    for path in [cfg.base_model, *cfg.models]:
        rows[Path(path).name] = ev.evaluate(alone(path, ev.inputs), "heldout").values()
    sources = dict(rows)
    failed = {}
    for label, recipe in merges:
        try:
            rows[label] = ev.evaluate(recipe, "heldout").values()
        except EvomergeError as err:  # e.g. multislerp where every model's task vector of a tensor is zero
            failed[str(label)] = first_line(err)
    tasks = list(cfg.tasks.heldout)
    oracle = {t: max(r[t] for r in sources.values()) for t in tasks}
    mean = {k: 100 * statistics.fmean(v.values()) for k, v in rows.items()}
    floor_name = max(mean, key=mean.get)
    data = {
        "sha256": manifest["sha256"],
        "rows": {k: {t: 100 * x for t, x in v.items()} for k, v in rows.items()},
        "mean": mean,
        "oracle": 100 * statistics.fmean(oracle.values()),
        "floor": mean[floor_name],
        "floor_name": floor_name,
        "n": {t: len(ev.scorer("heldout").indices(t)) for t in tasks},
        "failed": failed,  # default merges that could not be merged: not in the floor
    }
    data["room"] = data["oracle"] - data["floor"]
    cache.write_text(json.dumps(data, indent=1))
    return data


def run_one(job: dict) -> dict:
    """One search in a temporary run folder; the exported trial scored on held-out data."""
    _quiet()
    from evomerge.config.schema import parse_config
    from evomerge.run.driver import run_search
    from evomerge.study.record import TrialRecord
    from evomerge.study.storage import load_study
    from evomerge.study.trials import complete_trials, objective_of
    from evomerge.validate.guard import exported_trial, validate_top

    zoo = Path(job["zoo"])
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cfg = parse_config(config_for(zoo, job["method"], job["budget"], job["seed"], job["set"]))
        t0 = time.perf_counter()
        run_search(cfg, progress=False, log=None)
        search_s = time.perf_counter() - t0
        keep = Path(job["keep"]) / f"{job['variant']}-s{job['seed']}-b{job['budget']}" if job.get("keep") else None
        if keep:  # the study as the search left it (and again after the guard, below)
            shutil.copytree("runs", keep / "searched")
        study = load_study(cfg.name, cfg.storage_url)
        t1 = time.perf_counter()
        validate_top(cfg, study, log=None)
        pick = exported_trial(cfg, study)
        guard_s = time.perf_counter() - t1
        done = complete_trials(study)
        per_trial = sum(t.subset or 0 for t in cfg.tasks.search)
        records = [TrialRecord.from_trial(t) for t in done]
        examples = sum(r.examples_scored or per_trial for r in records)
        chosen = TrialRecord.from_trial(pick)
        held = heldout_scorer(cfg).evaluate(chosen.recipe, "heldout").values()
        if keep:  # the study and logs, to look at or re-validate later (no weights: nothing exported)
            shutil.copytree("runs", keep / "guarded")
        os.chdir(REPO)
    return {
        **{k: job[k] for k in ("variant", "method", "budget", "seed", "set", "label")},
        "heldout": {t: 100 * v for t, v in held.items()},
        "heldout_mean": 100 * statistics.fmean(held.values()),
        "pick": {
            "trial": pick.number,
            "baseline": str(chosen.baseline or ""),
            "refine_round": chosen.refine_round,
            "search": 100 * objective_of(pick),
        },
        "n_complete": len(done),
        "stopped": sum(1 for r in records if r.stopped_early),
        "examples": examples,
        "examples_full": per_trial * len(done),
        "search_s": round(search_s, 1),
        "guard_s": round(guard_s, 1),
    }


def _se(data: dict, heldout: dict) -> float:
    """Standard error (points) of a held-out mean over tasks of per-example accuracies."""
    tasks = list(heldout)
    var = sum((p / 100) * (1 - p / 100) / data["n"][t] for t, p in heldout.items())
    return 100 * math.sqrt(var) / len(tasks)


def _share(r: dict, b: dict) -> float:
    return (r["heldout_mean"] - b["floor"]) / b["room"] if b["room"] > 0 else float("nan")


def _counted(r: dict, b: dict) -> float:
    """The share a run adds to the means: at most 1 (a merge that beats the routing oracle, as qwen's do where its
    reversal specialist ends below its base, has captured all of the room, not four times it)."""
    return min(_share(r, b), 1.0)


def summarize(runs: list[dict], base: dict[str, dict]) -> str:
    """The per-member table (share of the room per budget, margins, below-floor counts, cost) and the mean share
    per budget."""
    lines = [
        "| variant | room (oracle - floor) | budget | held-out mean | margin over floor | share of room | "
        "below floor by > 1 SE | search s | s / trial | examples scored | examples / trial |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        b = base[variant]
        for budget in sorted({r["budget"] for r in runs if r["variant"] == variant}):
            rs = [r for r in runs if r["variant"] == variant and r["budget"] == budget]
            margins = [r["heldout_mean"] - b["floor"] for r in rs]
            below = sum(1 for r, m in zip(rs, margins) if m < -_se(b, r["heldout"]))
            ex = statistics.fmean(r["examples"] for r in rs)
            full = statistics.fmean(r["examples_full"] for r in rs)
            trials = statistics.fmean(r["n_complete"] for r in rs)
            search_s = statistics.fmean(r["search_s"] for r in rs)
            lines.append(
                f"| {variant} | {b['room']:.1f} ({b['oracle']:.1f} - {b['floor']:.1f} {b['floor_name']}) | {budget} | "
                f"{statistics.fmean(r['heldout_mean'] for r in rs):.1f} | {statistics.fmean(margins):+.1f} "
                f"(min {min(margins):+.1f}) | {statistics.fmean(_share(r, b) for r in rs):.2f} | {below}/{len(rs)} | "
                f"{search_s:.0f} | {search_s / trials:.2f} | {ex:.0f} ({100 * ex / full:.0f}%) | {ex / trials:.0f} |"
            )
    lines += ["", "| budget | mean share of the room over variants (each run at most 1) |", "|---:|---:|"]
    for budget, share in sorted(mean_shares(runs, base).items()):
        lines.append(f"| {budget} | {share:.2f} |")
    return "\n".join(lines)


def mean_shares(runs: list[dict], base: dict[str, dict]) -> dict[int, float]:
    """Per budget: the mean over variants of each variant's mean share over its seeds (each run's at most 1)."""
    out: dict[int, list[float]] = {}
    for budget in sorted({r["budget"] for r in runs}):
        for variant in dict.fromkeys(r["variant"] for r in runs):
            rs = [_counted(r, base[variant]) for r in runs if r["variant"] == variant and r["budget"] == budget]
            if rs:
                out.setdefault(budget, []).append(statistics.fmean(rs))
    return {k: statistics.fmean(v) for k, v in out.items()}


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def goal(runs: list[dict], base: dict[str, dict], ties_runs: list[dict] | None = None) -> str:
    """The issue's goal, met or not: at 100 trials a mean share >= 0.75, no member below 0.5, none below the floor
    by more than one SE; TIES within 0.10 of the default space; share at 200 >= share at 25 + 0.10."""
    shares = mean_shares(runs, base)
    at100 = [r for r in runs if r["budget"] == 100]
    per_member = {
        v: statistics.fmean(_counted(r, base[v]) for r in at100 if r["variant"] == v)
        for v in dict.fromkeys(r["variant"] for r in at100)
    }
    below = sum(
        1 for r in at100 if r["heldout_mean"] - base[r["variant"]]["floor"] < -_se(base[r["variant"]], r["heldout"])
    )
    out = []
    if 100 in shares:
        worst = min(per_member, key=per_member.get)
        out.append(f"mean share at 100 trials: {shares[100]:.2f} (goal >= 0.75: {_met(shares[100] >= 0.75)})")
        out.append(
            f"lowest member at 100 trials: {worst} {per_member[worst]:.2f} (goal >= 0.5: "
            f"{_met(per_member[worst] >= 0.5)})"
        )
        out.append(f"runs below the floor by > 1 SE at 100 trials: {below}/{len(at100)} (goal 0: {_met(below == 0)})")
    if 25 in shares and 200 in shares:
        gain = shares[200] - shares[25]
        out.append(f"share at 200 - share at 25: {gain:+.2f} (goal >= +0.10: {_met(gain >= 0.10)})")
    if ties_runs:
        ties = mean_shares([r for r in ties_runs if r["budget"] == 100], base).get(100)
        if ties is not None and 100 in shares:
            gap = shares[100] - ties
            verdict = _met(gap <= 0.10)
            out.append(f"TIES space at 100 trials: {ties:.2f}, {gap:+.2f} below the default (goal <= 0.10: {verdict})")
    return "\n".join(out)


def _where() -> dict:
    """Where and when a run was measured."""
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "torch": torch.__version__}


def summarize_log(log: Path, zoo_dir: Path, label: str, ties_label: str | None = None) -> str:
    """The tables and the goal of the runs labelled `label` in the log (their baselines from the zoos' caches, scored
    again where a cache lacks a default merge the portfolio has now)."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    runs = [r for r in rows if r["label"] == label]
    ties = [r for r in rows if ties_label and r["label"] == ties_label]
    base = {}
    for r in runs + ties:
        if r["variant"] not in base:
            base[r["variant"]] = baselines(zoo_path(zoo_dir, r["variant"]), r["method"])  # cached, checked
    text = f"{label} ({len(runs)} runs):\n{summarize(runs, base)}\n\n{goal(runs, base, ties)}"
    if ties:
        text += f"\n\n{ties_label} ({len(ties)} runs):\n{summarize(ties, base)}"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="25,50,100,200")
    p.add_argument("--method", default="task_arithmetic")
    p.add_argument("--set", default="{}", help="JSON merged into every run's config (e.g. '{\"refine\": false}')")
    p.add_argument("--jobs", type=int, default=2, help="searches side by side (one CPU thread each)")
    p.add_argument("--zoo-dir", default=str(REPO / ".cache" / "zoos"))
    p.add_argument("--label", default="shipped defaults")
    p.add_argument("--log", default=str(REPO / "bench" / "search_suite.jsonl"))
    p.add_argument("--keep", metavar="DIR", help="copy each search's run folder (its study) into DIR")
    p.add_argument("--summarize", metavar="LABEL", help="print the tables of the log's runs with this label; run none")
    p.add_argument("--ties-label", metavar="LABEL", help="with --summarize: the label of TIES runs for the goal")
    args = p.parse_args()
    if args.summarize:
        return print(summarize_log(Path(args.log), Path(args.zoo_dir), args.summarize, args.ties_label))

    zoo_dir = Path(args.zoo_dir)
    variants = [v for v in args.variants.split(",") if v]
    overrides = json.loads(args.set)
    _quiet()
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.real import build_real_zoo

    for v in variants:
        if not (zoo_path(zoo_dir, v) / "zoo.json").is_file():
            t = time.perf_counter()
            if v in REAL_VARIANTS:
                build_real_zoo(zoo_path(zoo_dir, v), seed=0, log=None)
            else:
                build_zoo(zoo_path(zoo_dir, v), seed=0, variant=v, log=None)
            print(f"built zoo {v} in {time.perf_counter() - t:.0f} s", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        base = dict(
            zip(variants, pool.map(baselines, [zoo_path(zoo_dir, v) for v in variants], [args.method] * len(variants)))
        )
        for v, b in base.items():
            print(
                f"{v}: floor {b['floor']:.1f} ({b['floor_name']}), oracle {b['oracle']:.1f}, room {b['room']:.1f}",
                flush=True,
            )
        jobs = [
            {
                "variant": v,
                "zoo": str(zoo_path(zoo_dir, v)),
                "method": args.method,
                "budget": int(n),
                "seed": int(s),
                "set": overrides,
                "label": args.label,
                "keep": args.keep,
            }
            for v in variants
            for s in args.seeds.split(",")
            for n in args.budgets.split(",")
        ]
        runs = []
        for result in pool.map(run_one, jobs):
            b = base[result["variant"]]
            share = (result["heldout_mean"] - b["floor"]) / b["room"] if b["room"] > 0 else float("nan")
            result.update(floor=b["floor"], oracle=b["oracle"], room=b["room"], share=share, **_where())
            runs.append(result)
            with open(args.log, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(
                f"{result['variant']} seed {result['seed']} budget {result['budget']}: held-out "
                f"{result['heldout_mean']:.1f} (floor {b['floor']:.1f}, oracle {b['oracle']:.1f}, share {share:+.2f}); "
                f"pick trial {result['pick']['trial']} {result['pick']['baseline']}; {result['search_s']:.0f} s",
                flush=True,
            )
    print()
    print(f"{args.label} ({args.method}, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs):")
    print(summarize(runs, base))
    print()
    print(goal(runs, base))


if __name__ == "__main__":
    sys.exit(main())
