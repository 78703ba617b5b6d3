"""A search never works in silence: before it starts it says what its budget buys (and that a budget its enqueued
baselines use up searches nothing), then a line for the portfolio's default merges, and a line at each refinement
round's start, at its steps and at its end."""

from __future__ import annotations

import re

from evomerge.config.schema import parse_config


def small_search(zoo, **changes):
    data = {
        "name": "small",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}, {"name": "zoo_reverse_search", "subset": 8}]},
        "sampler": {"name": "cmaes", "seed": 0},
        "budget": {"n_trials": 3},  # the three enqueued baselines: the default merge, each source alone
        "workers": {"count": 0},
        "refine": {"steps": 12, "every": 4},  # rounds at trials 1 and 2 (at: auto)
        **changes,
    }
    return parse_config(data)


def test_a_small_budget_search_says_what_it_does(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    result = run_search(small_search(tiny_zoo), progress=False, log=lines.append)
    assert result.n_complete == 3
    text = "\n".join(lines)
    # up front: the budget, its baselines and its refinement rounds, and that nothing is searched
    assert "budget: 3 trials = 3 enqueued baselines" in text
    assert "budget: warning: the 3 enqueued baselines use the whole budget of 3: nothing is searched" in text
    assert "budget: 2 refinement rounds (tensor, tensor) of 12 Adam steps each, at trials 1, 2" in text
    assert "the refinement rounds cost 2 x 12 gradient steps" in text
    # the portfolio, before the first trial: a line at its start and one per default merge
    start = next(i for i, line in enumerate(lines) if line.startswith("portfolio: scoring"))
    scored = [line for line in lines if re.match(r"portfolio \d+/\d+: \w+ default merge", line)]
    assert scored and all(lines.index(line) > start for line in scored)
    # each refinement round: its start, its steps as they are taken, its end
    for r in (1, 2):
        name = f"refinement round {r}/2"
        begun = next(i for i, line in enumerate(lines) if line.startswith(f"{name} (tensor): 12 Adam steps"))
        steps = [i for i, line in enumerate(lines) if re.match(rf"{name}: step \d+/12, surrogate loss", line)]
        ended = next(i for i, line in enumerate(lines) if line.startswith(f"{name} done in"))
        assert len(steps) == 3 and begun < steps[0] and steps[-1] < ended, lines
