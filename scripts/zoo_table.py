"""The demo zoo's held-out table: each model on each skill, and the four default merges (default kernels, in memory).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/zoo_table.py zoo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(zoo: Path) -> None:
    from evomerge.evaluator import Evaluator, alone
    from evomerge.recipe import ModelEntry, Recipe
    from evomerge.report.defaults import default_recipe
    from evomerge.scoring import TaskSpec
    from evomerge.tables import markdown_table

    manifest = json.loads((zoo / "zoo.json").read_text())
    names = list(manifest["specialists"])
    tasks = {"heldout": [TaskSpec(name=f"zoo_{n}") for n in names]}
    base, models = str(zoo / "base"), [str(zoo / n) for n in names]
    rows: dict[str, dict[str, float]] = {}

    ev = Evaluator(models, base, tasks)
    for label, path in [("base", base), *zip(names, models)]:
        rows[label] = ev.evaluate(alone(path, ev.inputs), "heldout").values()
    for method in ("task_arithmetic", "ties", "dare_ties"):
        rows[f"{method} (defaults)"] = ev.evaluate(default_recipe(method, base, models), "heldout").values()
    if len(models) == 2:  # SLERP joins two models: the specialists, halfway
        pair = Evaluator([models[1]], models[0], tasks)
        slerp = Recipe(merge_method="slerp", base_model=models[0], models=[ModelEntry(model=models[1])], parameters={"t": 0.5})
        rows["slerp t=0.5"] = pair.evaluate(slerp, "heldout").values()
    header = ["model", *(t.name for t in tasks["heldout"]), "mean"]
    table = [[label, *(f"{100 * v:.1f}" for v in s.values()), f"{100 * sum(s.values()) / len(s):.1f}"] for label, s in rows.items()]
    print("\n".join(markdown_table(header, table)))


if __name__ == "__main__":
    from evomerge.offline import go_offline

    go_offline()
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "zoo"))
