"""The demo zoo's held-out table: each model on each skill, and the four default merges (default kernels, in memory).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/zoo_table.py zoo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(zoo: Path) -> None:
    from evomerge.merge.materialize import Materializer
    from evomerge.recipe import ModelEntry, Recipe
    from evomerge.report.defaults import default_recipe
    from evomerge.scoring import Scorer, TaskSpec

    manifest = json.loads((zoo / "zoo.json").read_text())
    names = list(manifest["specialists"])
    tasks = [f"zoo_{n}" for n in names]
    scorer = Scorer([TaskSpec(name=t) for t in tasks])
    base, models = str(zoo / "base"), [str(zoo / n) for n in names]
    rows: dict[str, dict[str, float]] = {}

    def score(label: str, mat: Materializer) -> None:
        raw = scorer.score(mat.model, mat.tokenizer)
        rows[label] = {t: raw[t]["acc"] for t in tasks}

    mat = Materializer(models, base)
    for label, path in [("base", base), *zip(names, models)]:
        only = [1.0 if m == path else 0.0 for m in models]
        mat.apply(Recipe(merge_method="linear", base_model=None,
                         models=[ModelEntry(model=m, parameters={"weight": w}) for m, w in zip(models + [base], only + [float(path == base)])]))
        score(label, mat)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        mat.apply(default_recipe(method, base, models))
        score(f"{method} (defaults)", mat)
    if len(models) == 2:  # SLERP joins two models: the specialists, halfway
        pair = Materializer([models[1]], models[0])
        pair.apply(Recipe(merge_method="slerp", base_model=models[0], models=[ModelEntry(model=models[1])], parameters={"t": 0.5}))
        score("slerp t=0.5", pair)
    print("| model | " + " | ".join(tasks) + " | mean |")
    print("|---" * (len(tasks) + 2) + "|")
    for label, s in rows.items():
        print(f"| {label} | " + " | ".join(f"{100 * s[t]:.1f}" for t in tasks) + f" | {100 * sum(s.values()) / len(s):.1f} |")


if __name__ == "__main__":
    from evomerge.offline import go_offline

    go_offline()
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "zoo"))
