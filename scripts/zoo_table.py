"""A zoo's held-out table: each model on each specialist's skill (greedy exact match), every default merge of the
portfolio, the routing oracle, the floor and the room (in memory; what README's zoo tables show).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/zoo_table.py zoo
    OMP_NUM_THREADS=1 .venv/bin/python scripts/zoo_table.py zoo --mc      # multiple choice instead
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(zoo: Path, mc: bool = False) -> None:
    from evomerge.candidate.evaluator import Evaluator, alone
    from evomerge.candidate.portfolio import default_merges
    from evomerge.config.schema import parse_config
    from evomerge.scoring import TaskSpec
    from evomerge.tables import markdown_table

    names = list(json.loads((zoo / "zoo.json").read_text())["specialists"])
    tasks = [f"zoo_{n}" if mc else f"zoo_{n}_greedy" for n in names]
    cfg = parse_config(
        {
            "name": "table",
            "base_model": str(zoo / "base"),
            "models": [str(zoo / n) for n in names],
            "method": "task_arithmetic",
            "tasks": {"search": [{"name": tasks[0]}]},
        }
    )
    ev = Evaluator(cfg.models, cfg.base_model, {"heldout": [TaskSpec(name=t) for t in tasks]})
    rows: dict[str, dict[str, float]] = {}
    for path in [cfg.base_model, *cfg.models]:
        rows[Path(path).name] = ev.evaluate(alone(path, ev.inputs), "heldout").values()
    sources = dict(rows)
    for label, recipe in default_merges(cfg)[0]:
        rows[label] = ev.evaluate(recipe, "heldout").values()
    rows["routing oracle"] = {t: max(r[t] for r in sources.values()) for t in tasks}
    mean = {label: 100 * sum(s.values()) / len(s) for label, s in rows.items()}
    header = ["model", *tasks, "mean"]
    table = [[label, *(f"{100 * v:.1f}" for v in s.values()), f"{mean[label]:.1f}"] for label, s in rows.items()]
    print("\n".join(markdown_table(header, table)))
    floor = max((label for label in mean if label != "routing oracle"), key=mean.get)
    print(
        f"\nfloor {mean[floor]:.1f} ({floor}), routing oracle {mean['routing oracle']:.1f}, "
        f"room {mean['routing oracle'] - mean[floor]:.1f} points"
    )


if __name__ == "__main__":
    from evomerge.offline import go_offline

    go_offline()
    p = argparse.ArgumentParser(description="a zoo's held-out table")
    p.add_argument("zoo", nargs="?", default="zoo", type=Path)
    p.add_argument("--mc", action="store_true", help="multiple-choice tasks instead of greedy exact match")
    args = p.parse_args()
    main(args.zoo, args.mc)
