"""The CLI as a newcomer meets it: help in workflow order with examples and every flag explained, a closed pipe,
`demo --zoo`."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import yaml
from test_report import search

from evomerge.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = ["zoo", "audit", "search", "status", "export", "report"]


def _subparsers(parser: argparse.ArgumentParser):
    """(name, parser) of every subcommand, nested ones (zoo build) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", p) for n, p in _subparsers(sub))


def test_top_level_help_lists_the_workflow_in_order():
    text = build_parser().format_help()
    listing = text.split("positional arguments:")[1].split("options:")[0]
    positions = [listing.index(f"\n    {name} ") for name in WORKFLOW]
    assert positions == sorted(positions), listing
    assert list(COMMANDS)[: len(WORKFLOW)] == WORKFLOW
    epilog = text.split("a first session, in order:")[1]
    order = [epilog.index(f"evomerge {name} ") for name in WORKFLOW[:2]] + [
        epilog.index(f"evomerge {name} runs/demo") for name in ("status", "report", "export")
    ]
    assert order == sorted(order) and epilog.index("evomerge search ") < epilog.index("evomerge status ")


def test_every_command_has_examples_and_every_flag_has_help():
    subs = dict(_subparsers(build_parser()))
    assert set(COMMANDS) <= set(subs) and "zoo build" in subs
    for name, parser in subs.items():
        text = parser.format_help()
        if name != "zoo":  # `zoo` only holds `zoo build`, which has them
            assert "examples:\n  evomerge " in text, f"`evomerge {name} --help` has no example"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), (
                f"evomerge {name}: {action.option_strings or action.dest} has no help"
            )
    build = subs["zoo build"].format_help()
    assert "min" in build and "specialists" in build, "`zoo build --help` says what it builds and how long it takes"


def _status_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "evomerge", "status", str(run)]


def test_a_closed_pipe_ends_quietly(tiny_zoo, tmp_path):
    run = search(tmp_path, tiny_zoo, "pipe", "task_arithmetic", {"name": "random"}, 3)
    # the reader is gone before evomerge writes a byte: the write fails with EPIPE every time
    proc = subprocess.Popen([*_status_cmd(run), "--top", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err  # no BrokenPipeError traceback, no "Exception ignored" at exit
    # as a user types it
    out = subprocess.run(
        " ".join(_status_cmd(run)) + " | head -1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.startswith("study pipe ") and len(out.stdout.splitlines()) == 1
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_demo_searches_the_zoo_it_is_given(tiny_zoo, tmp_path, monkeypatch):
    """`demo --zoo DIR` merges DIR's models whatever folder the config names; then the report, then the export
    (whose card carries the report's held-out scores), each result printed as a sentence."""
    from evomerge.commands.demo import demo_config

    zoo = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(tiny_zoo, zoo)
    cfg = demo_config(REPO / "configs" / "demo.yaml", zoo)
    assert cfg.base_model == (zoo / "base").resolve() and cfg.models == [
        (zoo / "add").resolve(),
        (zoo / "reverse").resolve(),
    ]
    assert cfg.name == "demo" and cfg.method == "task_arithmetic"

    config = tmp_path / "tiny.yaml"  # the demo's own config, made small: its models point at no zoo at all
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data.update(
        base_model="../nowhere/base",
        models=["../nowhere/a", "../nowhere/b"],
        budget={"n_trials": 4},
        workers={"count": 0},
        validation=None,
        sampler={"name": "random"},
        tasks={
            **data["tasks"],
            "search": [{"name": "zoo_add_search", "subset": 10}, {"name": "zoo_reverse_search", "subset": 10}],
        },
    )
    config.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--zoo", str(zoo), "--config", str(config)]) == 0
    text = out.getvalue()
    assert f"== using the zoo in {zoo}" in text and "ExportResult(" not in text
    assert text.index("== held-out report") < text.index("== exporting")
    assert "   trial " in text and "runs/demo/best/recipe.yaml" in text
    recipe = yaml.safe_load((tmp_path / "runs" / "demo" / "best" / "recipe.yaml").read_text())
    assert recipe["base_model"] == str((zoo / "base").resolve())
    assert "## Held-out scores" in (tmp_path / "runs" / "demo" / "best" / "model" / "README.md").read_text()


def test_no_install_or_build_noise(tmp_path, capfd):
    """pyproject's license is an SPDX string (setuptools >= 77 warns three times per install otherwise), and saving
    a zoo checkpoint draws no 'Writing model shards' bar."""
    import tomllib

    from evomerge.zoo.build import _save
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import make_model
    from evomerge.zoo.variants import VARIANTS

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"])
    tokenizer = build_tokenizer()
    capfd.readouterr()
    _save(make_model(VARIANTS["tiny"].shape, tokenizer, 0), tokenizer, tmp_path / "m")
    assert "Writing model shards" not in capfd.readouterr().err and (tmp_path / "m" / "model.safetensors").is_file()


def test_search_workers_0_runs_in_this_process_without_ray(tiny_zoo, tmp_path, monkeypatch, capsys):
    """`--workers 0`, the debugging mode: the config's Ray workers replaced by one evaluator in this process."""
    from evomerge.config.schema import load_run_config
    from evomerge.study.storage import load_study
    from evomerge.study.trials import budget_count

    config = tmp_path / "zero.yaml"
    data = {
        "name": "zero",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}]},
        "sampler": {"name": "random"},
        "budget": {"n_trials": 3},
        "workers": {"count": 2},
        "portfolio": False,
        "refine": None,
        "early_stop": None,
    }
    config.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(config), "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "loading the models and tasks in this process (workers.count: 0)" in out
    ray = sys.modules.get("ray")  # not imported here: importing Ray early changes how it later reads its auth token
    assert ray is None or not ray.is_initialized(), "no Ray"
    cfg = load_run_config(tmp_path / "runs" / "zero")
    assert cfg.workers.count == 0 and budget_count(load_study("zero", cfg.storage_url)) == 3

    assert main(["search", str(config), "--workers", "-1"]) == 2
    assert "--workers must be 0" in capsys.readouterr().err
