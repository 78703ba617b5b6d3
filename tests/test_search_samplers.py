"""Samplers (study/study.py): every registered name builds, its options are Optuna's, defaults follow the space's
dimension, CMA-ES warm start works."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import optuna
import pytest

from evomerge.candidate.space import space_of
from evomerge.config.schema import parse_config, write_run_config
from evomerge.errors import ConfigError
from evomerge.study import study as st
from evomerge.study.samplers import SAMPLERS, SEPARABLE_DIM, auto_options, distributions, make_sampler, sampler_for

SPACE = {
    "methods": ["task_arithmetic"],
    "layers_per_group": 2,
    "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}, "lambda": {"value": 1.0}},
}  # 2 models x 2 layer groups: 4 searched numbers


def make_config(tmp_path: Path, name: str = "src", **changes):
    for model in ("base", "add", "reverse"):
        (tmp_path / "zoo" / model).mkdir(parents=True, exist_ok=True)
        (tmp_path / "zoo" / model / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    data = {
        "name": name,
        "base_model": "zoo/base",
        "models": ["zoo/add", "zoo/reverse"],
        "method": "task_arithmetic",
        "search_space": SPACE,
        "tasks": {"search": [{"name": "zoo_add_search"}]},
        "sampler": {"name": "cmaes", "seed": 0},
        **changes,
    }
    return parse_config(data, base_dir=tmp_path)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_with_its_dimension_defaults(name):
    sampler = make_sampler(name, seed=1, dim=28)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    if name == "cmaes":
        assert sampler._popsize == auto_options("cmaes", 28, {})["popsize"]
        assert sampler._sigma0 == auto_options("cmaes", 28, {})["sigma0"]


def test_cmaes_defaults_follow_the_dimension_and_yield_to_the_config():
    small, large = auto_options("cmaes", 4, {}), auto_options("cmaes", 200, {})
    assert 6 <= small["popsize"] <= large["popsize"] <= 12
    assert "use_separable_cma" not in small and large["use_separable_cma"] is True
    assert auto_options("cmaes", SEPARABLE_DIM + 1, {"popsize": 20, "use_separable_cma": False}) == {"sigma0": 0.25}
    assert "sigma0" not in auto_options("cmaes", 200, {}, warm_start=True)  # WS-CMA-ES derives it
    assert auto_options("tpe", 28, {}) == {}
    sampler = make_sampler("cmaes", options={"popsize": 5}, dim=200)
    assert sampler._popsize == 5 and sampler._use_separable_cma


def test_warm_start_is_checked_where_the_config_enters(tmp_path):
    with pytest.raises(ConfigError, match="warm_start works with the cmaes sampler only"):
        make_config(tmp_path, sampler={"name": "tpe", "warm_start": "runs/x"})
    with pytest.raises(ConfigError, match="derives sigma0 from the earlier trials"):
        make_config(tmp_path, sampler={"name": "cmaes", "warm_start": "runs/x", "options": {"sigma0": 0.1}})
    with pytest.raises(ConfigError, match="is set by `sampler.warm_start: RUN_DIR`"):
        make_config(tmp_path, sampler={"name": "cmaes", "options": {"source_trials": []}})


def _peak(params: dict) -> float:
    return -sum((v - 0.85) ** 2 for v in params.values())  # best near 0.85, far from the middle (0.5)


def test_warm_start_begins_where_the_earlier_study_did_well(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = make_config(tmp_path, "src")
    space = space_of(src)
    write_run_config(src)
    study = st.open_study(src, space, log=None)
    dists = distributions(space, src.models)
    rand = optuna.samplers.RandomSampler(seed=0)
    probe = optuna.create_study(sampler=rand)
    for _ in range(40):  # an earlier exploration of the space, scored by a toy objective
        t = probe.ask(dists)
        study.add_trial(optuna.trial.create_trial(params=t.params, distributions=dists, value=_peak(t.params)))

    def first_generation(cfg) -> list[float]:
        new = st.open_study(cfg, space_of(cfg), log=None)
        means = []
        for _ in range(20):
            trial = st.ask(new, dists)
            if "baseline" not in trial.user_attrs:
                means.append(sum(trial.params.values()) / len(trial.params))
            new.tell(trial, _peak(trial.params))
        return means

    cold = make_config(tmp_path, "cold")
    warm = make_config(tmp_path, "warm", sampler={"name": "cmaes", "seed": 0, "warm_start": "runs/src"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = sampler_for(warm, space_of(warm))
        assert len(sampler._source_trials) == 40  # the COMPLETE ones (the enqueued baselines never ran)
        cold_means, warm_means = first_generation(cold), first_generation(warm)
    assert abs(sum(warm_means) / len(warm_means) - 0.85) < abs(sum(cold_means) / len(cold_means) - 0.85)
    assert sum(warm_means) / len(warm_means) > 0.65

    other = make_config(
        tmp_path,
        "other",
        search_space={**SPACE, "layers_per_group": 1},
        sampler={"name": "cmaes", "warm_start": "runs/src"},
    )
    with pytest.raises(ConfigError, match="no COMPLETE trial over this search space"):
        sampler_for(other, space_of(other))
    missing = make_config(tmp_path, "missing", sampler={"name": "cmaes", "warm_start": "runs/nope"})
    with pytest.raises(ConfigError, match="sampler.warm_start: runs/nope: no config.yaml"):
        sampler_for(missing, space_of(missing))
    by_name = make_config(
        tmp_path, "byname", sampler={"name": "cmaes", "warm_start": {"study": "src", "storage": src.storage_url}}
    )
    assert len(sampler_for(by_name, space_of(by_name))._source_trials) == 40


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_config_layer_knows_each_samplers_options_without_importing_optuna(name):
    """config.py lists each sampler's options as data (so loading a config never imports Optuna): they must be
    exactly the keyword arguments of the installed Optuna class, less the two evomerge sets itself."""
    import inspect

    cls = getattr(optuna.samplers, SAMPLERS[name].optuna_class)
    assert set(SAMPLERS[name].options) == set(inspect.signature(cls).parameters) - {"seed", "source_trials"}
    assert set(SAMPLERS[name].defaults) <= set(SAMPLERS[name].options)
    assert SAMPLERS[name].multi_objective == (name == "nsga2")
