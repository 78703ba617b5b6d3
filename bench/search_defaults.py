"""Which search space and sampler settings find the best held-out recipe on the demo zoo, and how fast.

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_defaults.py --zoo zoo --label ties-cma \\
        --config configs/demo.yaml --n-trials 100 [--space ties] [--method ties] [--sampler '{"name": "tpe"}'] \\
        [--space-override '{"layers_per_group": 3}'] [--subset 100] [--top-k 3] [--log bench/search_defaults.jsonl]

Results of the runs behind the defaults: bench/search_defaults.jsonl (one JSON line per run).
One search per call (in-process, `InlinePool`, its study in a temp folder), then the held-out mean of its
best trial and of its top-k trials (with their validation scores), as one JSON line appended to `--log`.
`--baselines` also scores the sources, every default merge and the routing oracle on the held-out tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml


def _tasks(names: list[str], subset: int | None):
    from evomerge.scoring import TaskSpec

    return [TaskSpec(name=n, subset=subset) for n in names]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", default="zoo")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--label", required=True)
    p.add_argument("--n-trials", type=int, default=100)
    p.add_argument("--method", default=None)
    p.add_argument("--space", default=None, help="a search space name or path (default: the config's)")
    p.add_argument("--space-override", default="{}", help="JSON merged into the space spec")
    p.add_argument("--sampler", default=None, help="JSON sampler section (default: the config's)")
    p.add_argument("--subset", type=int, default=None, help="search subset per task (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--baselines", action="store_true")
    p.add_argument("--log", default="bench/search_defaults.jsonl")
    args = p.parse_args()

    from evomerge.offline import go_offline

    go_offline()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from evomerge.config import parse_config
    from evomerge.evaluator import Evaluator, alone
    from evomerge.search import study as st
    from evomerge.search.driver import run_search
    from evomerge.search.workers import InlinePool
    from evomerge.space import load_space_spec, space_of

    zoo = Path(args.zoo).resolve()
    data = yaml.safe_load(Path(args.config).read_text())
    data.update(base_model=str(zoo / "base"), models=[str(zoo / "add"), str(zoo / "reverse")], seed=args.seed)
    data.pop("validation", None)
    if args.method:
        data["method"] = args.method
    spec = load_space_spec(args.space or data.get("search_space") or data["method"]).model_dump(exclude_none=True)
    spec.update(json.loads(args.space_override))
    data["search_space"] = spec
    if args.sampler:
        data["sampler"] = json.loads(args.sampler)
    if args.subset:
        for t in data["tasks"]["search"]:
            t["subset"] = args.subset
    data["budget"] = {"n_trials": args.n_trials}
    data["name"] = "bench"
    data["workers"] = {"count": 1, "num_cpus": 1}
    heldout_names = data["tasks"]["heldout"]
    val_names = [t["name"].replace("_search", "_val") for t in data["tasks"]["search"]]

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cfg = parse_config(data, base_dir=Path(args.config).resolve().parent)
        dim = len(space_of(cfg).slots(cfg.models))
        t0 = time.perf_counter()
        res = run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
        search_s = time.perf_counter() - t0
        study = st.load_study(cfg.name, cfg.storage_url)
        done = st.complete_trials(study)
        ranked = sorted(done, key=lambda t: (-st.objective_of(t), t.number))[: args.top_k]

        ev = Evaluator.for_config(cfg, {"heldout": _tasks(heldout_names, None), "val": _tasks(val_names, None)})

        def score(task_set, recipe=None) -> dict[str, float]:
            if recipe is not None:
                ev.load(recipe)
            return {k: round(v, 4) for k, v in ev.score(task_set).values().items()}

        def mean(d: dict[str, float]) -> float:
            return round(sum(d.values()) / len(d), 4)

        top = []
        for t in ranked:
            h = score("heldout", t.user_attrs["recipe"])
            v = score("val")
            top.append({"trial": t.number, "baseline": t.user_attrs.get("baseline", ""), "search": round(st.objective_of(t), 4),
                        "val": mean(v), "heldout": mean(h), "heldout_tasks": h})  # fmt: skip
        line = {
            "label": args.label,
            "method": cfg.method,
            "space": {k: v for k, v in spec.items() if k not in ("description",)},
            "sampler": cfg.sampler.model_dump(),
            "dim": dim,
            "subset": [t.subset for t in cfg.tasks.search],
            "seed": args.seed,
            "n_complete": res.n_complete,
            "n_failed": res.n_failed,
            "search_s": round(search_s, 1),
            "s_per_trial": round(search_s / max(res.n_complete, 1), 2),
            "best": top[0],
            "top": top,
            "trajectory": [round(st.objective_of(t), 4) for t in sorted(done, key=lambda t: t.number)],
        }
        if args.baselines:
            from evomerge.report.compare import _default_recipes

            rows = {}
            for name in ["base", "add", "reverse"]:
                rows[name] = {"heldout": score("heldout", alone(zoo / name, ev.inputs)), "val": score("val")}
            for method, recipe in _default_recipes(cfg)[0]:
                rows[f"{method} (defaults)"] = {"heldout": score("heldout", recipe), "val": score("val")}
            line["rows"] = {k: {**v, "heldout_mean": mean(v["heldout"]), "val_mean": mean(v["val"])} for k, v in rows.items()}
    os.chdir(Path(__file__).resolve().parents[1])
    with open(args.log, "a") as f:
        f.write(json.dumps(line) + "\n")
    b = line["best"]
    print(f"{args.label}: dim {dim}, {res.n_complete} trials in {search_s:.0f} s ({line['s_per_trial']} s/trial); "
          f"best #{b['trial']} search {b['search']} val {b['val']} heldout {b['heldout']}")  # fmt: skip


if __name__ == "__main__":
    main()
