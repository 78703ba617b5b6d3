"""An installed evomerge: the wheel built from this tree carries search_spaces/ and eval_tasks/, and a fresh
environment with no source tree on its path runs a search over a shipped space and shipped tasks, then exports.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import yaml
from installed import REPO, clean_env, site_packages


def shipped(folder: str) -> set[str]:
    """The files of a top-level data folder, as the wheel must name them."""
    root = REPO / folder
    return {f"evomerge/{folder}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file()}


def test_the_wheel_ships_every_space_and_task_file_and_finds_them_installed(
    tmp_path, evomerge_wheel, installed_evomerge
):
    names = set(zipfile.ZipFile(evomerge_wheel).namelist())
    for folder in ("search_spaces", "eval_tasks"):
        want = shipped(folder)
        assert want and want <= names, f"missing from the wheel: {sorted(want - names)[:5]}"
    assert not any(n.startswith(("search_spaces/", "eval_tasks/", "tests/")) for n in names), (
        "data only inside the package"
    )

    # the installed package finds them through importlib.resources, from anywhere, with no checkout on its path
    probe = (
        "import json, sys, evomerge\n"
        "from evomerge.candidate.space import SPACES_DIR, load_space_spec\n"
        "from evomerge.scoring.tasks import BUILTIN_TASKS\n"
        "print(json.dumps({'package': evomerge.__file__, 'spaces': str(SPACES_DIR), 'tasks': str(BUILTIN_TASKS),\n"
        "    'ties': load_space_spec('ties').methods, 'path': sys.path}))\n"
    )
    out = subprocess.run(
        [installed_evomerge / "bin" / "python", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    package = site_packages(installed_evomerge) / "evomerge"
    assert Path(got["package"]).parent == package
    assert Path(got["spaces"]) == package / "search_spaces" and Path(got["tasks"]) == package / "eval_tasks"
    assert "ties" in got["ties"]
    assert not any(p and Path(p).resolve() == REPO for p in got["path"]), "the checkout must not be on sys.path"


def test_an_installed_evomerge_searches_and_exports_from_outside_the_repository(tmp_path, tiny_zoo, installed_evomerge):
    config = {
        "name": "installed",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
        "method": "ties",
        "search_space": "ties",  # the wheel's search_spaces/ties.yaml
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}]},  # the wheel's eval_tasks/zoo
        "sampler": {"name": "random"},
        "budget": {"n_trials": 4},
        "workers": {"count": 0},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))

    def evomerge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [installed_evomerge / "bin" / "evomerge", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=600,
        )

    searched = evomerge("search", "search.yaml", "--no-progress")
    assert searched.returncode == 0, searched.stderr
    assert "4 complete trials" in searched.stdout
    exported = evomerge("export", "runs/installed")
    assert exported.returncode == 0, exported.stderr
    best = tmp_path / "runs" / "installed" / "best"
    recipe = yaml.safe_load((best / "recipe.yaml").read_text())
    assert recipe["merge_method"] == "ties" and recipe["evomerge"]["study"] == "installed"
    assert 0.0 <= recipe["evomerge"]["scores"]["zoo_add_search"] <= 1.0
    assert (best / "model" / "config.json").is_file() and list((best / "model").glob("*.safetensors"))
    verified = evomerge("verify", str(best / "model"))
    assert verified.returncode == 0, verified.stderr
