"""bench/interference.py: the verdict rules, and one run on the tiny zoo."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("interference", REPO / "bench" / "interference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "need_a, hurt_a, need_b, hurt_b, verdict",
    [
        (30.0, 20.0, 40.0, 0.0, "conflict"),  # both need it and B's vector hurts A there: no recipe keeps both
        (30.0, 20.0, 2.0, 0.0, "routable"),  # B's vector hurts A but B does not need it: drop B there
        (2.0, 0.0, 3.0, 8.0, "routable"),  # the mirror case
        (30.0, 1.0, 40.0, 2.0, "quiet"),  # both need it but neither hurts the other: a plain sum keeps both
        (30.0, 20.0, 12.0, 0.0, "conflict"),
    ],
)
def test_verdict(need_a, hurt_a, need_b, hurt_b, verdict):
    assert _module()._verdict(need_a, hurt_a, need_b, hurt_b).split()[0] == verdict


@pytest.mark.slow
def test_runs_on_tiny_zoo(tiny_zoo):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "interference.py"), "--zoo", str(tiny_zoo)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| layers.") or line.startswith("| self_attn")]
    assert len(rows) == 4 + 1  # the tiny zoo has 4 layers, then all attention
    numbers = [float(x) for x in re.findall(r"[-+]\d+\.\d", " ".join(rows))]
    assert len(numbers) == 4 * len(rows)
    assert all(-100.0 <= x <= 100.0 for x in numbers)
    assert re.search(r"Regions: \d+ conflict, \d+ routable, \d+ quiet", out.stdout)
