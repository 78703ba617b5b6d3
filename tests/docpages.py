"""Run a docs page's commands as written: every fenced block whose info string is `bash`, in order, in a fresh
folder with `evomerge` and `python` on PATH (this tree's package), the clone's `scripts/` linked in, offline.

    home, env = user_folder(tmp_path)
    outputs = run_blocks(REPO / "docs" / "walkthrough.md", home, env)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def page_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block, in order."""
    pattern = r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$"
    return [(m["info"].strip(), m["body"]) for m in re.finditer(pattern, text, re.S | re.M)]


def user_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh working folder (the clone's scripts/ linked in; `evomerge` runs this tree's package, `python` and
    the environment's tools such as mergekit-yaml are on PATH) and its environment, Hugging Face caches inside."""
    home = tmp_path / "work"
    (home / "bin").mkdir(parents=True)
    (home / "scripts").symlink_to(REPO / "scripts")
    shim = home / "bin" / "evomerge"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m evomerge "$@"\n')
    shim.chmod(0o755)
    python = home / "bin" / "python"  # a script, not a link: a venv's python finds its packages by its own path
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    path = os.pathsep.join([str(home / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
    }
    return home, env


def run_blocks(page: Path, home: Path, env: dict[str, str]) -> list[str]:
    """Each `bash` block of `page` under `bash -euo pipefail` in `home`; their stdout. A failing block fails with
    the block and the tail of its output."""
    outputs = []
    for info, body in page_blocks(page.read_text()):
        if info != "bash":
            continue
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body], cwd=home, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, (
            f"block failed:\n{body}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
        )
        outputs.append(run.stdout)
    return outputs
