"""evomerge as a user installs it: a wheel built from this tree, installed into a fresh environment that holds no
source tree. Used by the `evomerge_wheel` and `installed_evomerge` fixtures (conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "evomerge", "search_spaces", "eval_tasks")  # what the wheel is built from


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` on a copy of the tree (links kept as links), so the checkout gets no build/ folder."""
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
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = dist.glob("evomerge-*.whl")
    return wheel


def fresh_env(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed (`pip install --no-deps`); its dependencies (torch, lm-eval, Ray, ...)
    are this environment's, added as one plain folder by a .pth line, so nothing is downloaded. (`venv
    --system-site-packages` made from inside a venv gives the base interpreter's packages, not the venv's.) A plain
    folder runs none of the .pth files in it, so this environment's editable evomerge (an import hook installed by
    one) is not importable there: `evomerge` can only come from the wheel."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    (site_packages(env) / "outer_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(  # pip comes from the outer environment too; --ignore-installed: never touch that one's evomerge
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return env


def site_packages(env: Path) -> Path:
    out = subprocess.run(
        [env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a PYTHONPATH or an active venv (nothing points at the checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}
