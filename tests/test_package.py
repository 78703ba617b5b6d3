"""An installed evomerge: the wheel built from this tree carries search_spaces/ and eval_tasks/, and a fresh
environment with no source tree on its path runs a search over a shipped space and shipped tasks, then exports.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "evomerge", "search_spaces", "eval_tasks")  # what the wheel is built from


def shipped(folder: str) -> set[str]:
    """The files of a top-level data folder, as the wheel must name them."""
    root = REPO / folder
    return {f"evomerge/{folder}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file()}


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` on a copy of the tree (links kept as links): the checkout gets no build/ folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("evomerge-*.whl")
    return wheel


def fresh_env(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed, its dependencies (torch, lm-eval, ...) read from this test's
    environment through a .pth line, so nothing is downloaded. (`venv --system-site-packages` would give the
    base interpreter's packages, not this venv's.) Only plain folders are added, so this environment's editable
    evomerge (an import hook in a .pth file there) is not: `evomerge` can only come from the wheel."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(site) / "outer_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(  # pip comes from the outer environment too; --ignore-installed: never touch that one's evomerge
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> Path:
    """The fresh environment's root (its `bin/evomerge`), shared by this module's tests."""
    return fresh_env(tmp_path_factory.mktemp("installed"), wheel)


def test_the_wheel_ships_every_space_and_task_file(tmp_path, wheel, installed):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("search_spaces", "eval_tasks"):
        want = shipped(folder)
        assert want and want <= names, f"missing from the wheel: {sorted(want - names)[:5]}"
    assert not any(n.startswith(("search_spaces/", "eval_tasks/", "tests/")) for n in names), "data only inside the package"

    # the installed package finds them through importlib.resources, from anywhere, with no checkout on its path
    env = installed
    outside = tmp_path / "outside"
    outside.mkdir()
    probe = (
        "import json, sys, evomerge\n"
        "from evomerge.space import SPACES_DIR, load_space_spec\n"
        "from evomerge.scoring.tasks import BUILTIN_TASKS\n"
        "print(json.dumps({'package': evomerge.__file__, 'spaces': str(SPACES_DIR), 'tasks': str(BUILTIN_TASKS),\n"
        "    'ties': load_space_spec('ties').methods, 'path': sys.path}))\n"
    )
    out = subprocess.run([env / "bin" / "python", "-c", probe], cwd=outside, capture_output=True, text=True,
                         env=_clean_env(), timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    package = Path(got["package"]).parent
    assert package.is_relative_to(env), got["package"]
    assert Path(got["spaces"]) == package / "search_spaces" and Path(got["tasks"]) == package / "eval_tasks"
    assert "ties" in got["ties"]
    assert not any(p and Path(p).resolve() == REPO for p in got["path"]), "the checkout must not be on sys.path"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_an_installed_evomerge_searches_and_exports_from_outside_the_repository(tmp_path, tiny_zoo, installed):
    env = installed
    work = tmp_path / "outside"
    work.mkdir()
    config = {
        "name": "installed",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
        "method": "ties",
        "search_space": "ties",  # the wheel's search_spaces/ties.yaml
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}], "heldout": ["zoo_add"]},  # the wheel's eval_tasks/zoo
        "sampler": {"name": "random"},
        "budget": {"n_trials": 4},
        "workers": {"count": 0},
    }
    (work / "search.yaml").write_text(yaml.safe_dump(config))
    evomerge = str(env / "bin" / "evomerge")
    run = lambda *args: subprocess.run([evomerge, *args], cwd=work, capture_output=True, text=True,  # noqa: E731
                                       env=_clean_env(), timeout=600)  # fmt: skip

    searched = run("search", "search.yaml", "--no-progress")
    assert searched.returncode == 0, searched.stderr
    assert "4 complete trials" in searched.stdout
    exported = run("export", "runs/installed")
    assert exported.returncode == 0, exported.stderr
    best = work / "runs" / "installed" / "best"
    recipe = yaml.safe_load((best / "recipe.yaml").read_text())
    assert recipe["merge_method"] == "ties" and recipe["evomerge"]["study"] == "installed"
    assert 0.0 <= recipe["evomerge"]["scores"]["zoo_add_search"] <= 1.0
    assert (best / "model" / "config.json").is_file() and list((best / "model").glob("*.safetensors"))
    verified = run("verify", str(best / "model"))
    assert verified.returncode == 0, verified.stderr
