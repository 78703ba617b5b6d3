"""The search config: validated once, one-line errors naming file, field and fix; every shipped YAML loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.candidate.space import SearchSpace, load_space_spec
from evomerge.config.schema import load_config, load_run_config, parse_config, write_run_config
from evomerge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def fake_model(path: Path, layers: int = 4) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return path


def write_config(tmp_path: Path, **changes) -> Path:
    for name in ("base", "add", "reverse"):
        fake_model(tmp_path / "zoo" / name)
    data = {
        "name": "cfgtest",
        "base_model": "zoo/base",
        "models": ["zoo/add", "zoo/reverse"],
        "method": "ties",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 20}, {"name": "zoo_reverse_search"}]},
        **changes,
    }
    path = tmp_path / "conf" / "search.yaml"
    path.parent.mkdir(exist_ok=True)
    # model paths are relative to the config file
    data["base_model"] = (
        "../" + data["base_model"] if not str(data["base_model"]).startswith("/") else data["base_model"]
    )
    data["models"] = ["../" + m for m in data["models"]]
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_resolves_paths_and_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_config(tmp_path))
    assert cfg.base_model == (tmp_path / "zoo" / "base").resolve()
    assert cfg.models[1] == (tmp_path / "zoo" / "reverse").resolve()
    assert cfg.sampler.name == "cmaes" and cfg.budget.n_trials == 20 and cfg.workers.count == 1
    assert cfg.storage_url == f"sqlite:///{tmp_path.resolve()}/runs/cfgtest/study.db"
    # the search space is resolved inline (the `method` named the shipped file)
    assert cfg.search_space["name"] == "ties" and "weight" in cfg.search_space["parameters"]
    assert not cfg.multi_objective


def test_overrides_and_run_config_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_config(tmp_path), n_trials=7, workers=2, storage="sqlite:///x.db")
    assert (cfg.budget.n_trials, cfg.workers.count, cfg.storage) == (7, 2, "sqlite:///x.db")
    path = write_run_config(cfg)
    assert path == Path("runs/cfgtest/config.yaml")
    again = load_run_config("runs/cfgtest")
    assert again.study_hash() == cfg.study_hash()
    assert again.budget.n_trials == 7 and again.storage == f"sqlite:///{tmp_path.resolve()}/x.db"


def test_unknown_keys_are_all_reported_on_one_line_with_suggestions(tmp_path):
    path = write_config(tmp_path, sampler={"nmae": "tpe"}, budjet={"n_trials": 3})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert "'sampler.nmae'" in msg and "did you mean: name" in msg
    assert "'budjet'" in msg and "did you mean: budget" in msg


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"sampler": {"name": "cmaz"}}, "did you mean: cmaes"),
        ({"sampler": {"name": "tpe", "options": {"n_startup": 3}}}, "did you mean: n_startup_trials"),
        ({"method": "slerp"}, "at most 1 model"),
        ({"method": "della", "search_space": "ties"}, "is not searched by space 'ties'"),
        ({"search_space": "tie"}, "did you mean: ties"),
        ({"budget": {"n_trials": 0}}, "'budget.n_trials'"),
        ({"tasks": {"search": []}}, "'tasks.search'"),
        ({"name": "a b"}, "'name'"),
        ({"base_model": "zoo/missing"}, "'base_model': "),
        ({"search_space": {"methods": ["ties"], "parameters": {"weight": {"low": 1, "high": 0}}}}, "must be below"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, changes, expected):
    with pytest.raises(ConfigError, match="search.yaml") as err:
        load_config(write_config(tmp_path, **changes))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_study_hash_ignores_runtime_fields_only(tmp_path):
    base = load_config(write_config(tmp_path))
    runtime = load_config(
        write_config(tmp_path, budget={"n_trials": 99}, workers={"count": 3}, storage="sqlite:///y.db")
    )
    other = load_config(write_config(tmp_path, seed=1))
    assert runtime.study_hash() == base.study_hash()
    assert other.study_hash() != base.study_hash()


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_space_loads(path):
    spec = load_space_spec(path)
    assert spec.name == path.stem
    for layers in (4, 6):
        space = SearchSpace(spec, layers)
        models = ["/m/add"] if spec.max_models == 1 else ["/m/add", "/m/reverse"]
        assert space.bounds(models)
        assert space.baselines(models)[0][0] == "defaults"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# evomerge search configs/"), "a shipped config begins with the command that runs it"
    cfg = parse_config(yaml.safe_load(path.read_text()), source=str(path), base_dir=path.parent, check_files=False)
    assert cfg.method in cfg.search_space["methods"]


def test_kernels_default_env_and_explicit(tmp_path, monkeypatch):
    """`kernels:` picks the set trial recipes record; unset, $EVOMERGE_KERNELS or evomerge-1, resolved at load."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)
    assert load_config(write_config(tmp_path)).kernels == "evomerge-1"
    assert load_config(write_config(tmp_path, kernels="mergekit")).kernels == "mergekit-0.1.5"
    monkeypatch.setenv("EVOMERGE_KERNELS", "mergekit")
    cfg = load_config(write_config(tmp_path))
    assert cfg.kernels == "mergekit-0.1.5"
    monkeypatch.delenv("EVOMERGE_KERNELS")
    write_run_config(cfg)  # the resolved config records the set, so a resume keeps it
    assert load_run_config(tmp_path / "runs" / "cfgtest").kernels == "mergekit-0.1.5"
    assert cfg.study_hash() != load_config(write_config(tmp_path)).study_hash()  # results differ: another study


def test_builtin_lm_eval_tasks_are_asked_for_in_the_config(tmp_path, monkeypatch):
    """lm-eval's own task index (~30 s to build) is off unless `tasks.include_defaults: true`; a built-in task name
    without it fails naming that field, not a flag `search` does not have."""
    from evomerge.config.resolve import check_tasks

    monkeypatch.chdir(tmp_path)
    tasks = {"search": [{"name": "arc_easy"}]}
    cfg = load_config(write_config(tmp_path, tasks=tasks))
    assert cfg.tasks.include_defaults is False and "include_defaults" not in cfg.study_fields()["tasks"]
    with pytest.raises(ConfigError) as err:
        check_tasks(cfg)
    msg = str(err.value)
    assert "unknown task 'arc_easy'" in msg and "`tasks.include_defaults: true` in a search config" in msg
    assert "`tasks.include_paths` in a search config" in msg and len(msg.splitlines()) == 1
    on = load_config(write_config(tmp_path, tasks={**tasks, "include_defaults": True}))
    assert on.tasks.include_defaults is True and on.study_fields()["tasks"]["include_defaults"] is True
    assert on.study_hash() != cfg.study_hash(), "another task index: another study"


@pytest.mark.slow
def test_include_defaults_indexes_lm_evals_own_tasks(tmp_path, tiny_zoo, monkeypatch):
    """With the index on, a built-in name is found (its data then needs the network, which the run does not have:
    'failed to load', no longer 'unknown task'), and a search with it on runs as before (~30 s per index)."""
    from test_search_faults import zoo_config

    from evomerge.config.resolve import check_tasks
    from evomerge.run.driver import run_search
    from evomerge.run.pool import InlinePool

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_tasks(zoo_config(tiny_zoo, tasks={"search": [{"name": "arc_easy"}], "include_defaults": True}))
    assert "task arc_easy" in str(err.value) and "unknown task" not in str(err.value)
    cfg = zoo_config(tiny_zoo, tasks={"search": [{"name": "zoo_add_search", "subset": 8}], "include_defaults": True})
    assert run_search(cfg, progress=False, log=None, pool_factory=InlinePool).n_complete == 3
