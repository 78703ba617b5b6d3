"""A search keeps what its exported model did on held-out examples: `evomerge export RUN --samples N` writes
OUT/samples.jsonl, the exported checkpoint's first N examples of each held-out task as lm-eval scored them."""

from __future__ import annotations

import json

from evomerge.cli import main
from evomerge.config.schema import parse_config


def test_export_keeps_the_exported_models_held_out_samples(tiny_zoo, tmp_path, monkeypatch, capsys):
    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        {
            "name": "samples",
            "base_model": str(tiny_zoo / "base"),
            "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
            "method": "task_arithmetic",
            "tasks": {
                "search": [{"name": "zoo_add_search", "subset": 8}],
                "heldout": ["zoo_add_greedy", "zoo_reverse_greedy"],
            },
            "budget": {"n_trials": 3},
            "workers": {"count": 0},
            "refine": None,
            "portfolio": False,
        }
    )
    run_search(cfg, progress=False, log=None)
    assert main(["export", str(cfg.run_dir), "--samples", "2"]) == 0
    assert "held-out samples written to" in capsys.readouterr().out
    rows = [json.loads(line) for line in (cfg.run_dir / "best" / "samples.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["zoo_add_greedy"] * 2 + ["zoo_reverse_greedy"] * 2
    for row in rows:
        assert row["prompt"] and row["reference"] and "greedy answer" in row["response"]
        assert row["acc"] in (0, 1)
