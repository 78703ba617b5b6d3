"""Thread discipline: idle OpenMP threads sleep and torch gets the CPUs the process was given.

The effect itself (two processes side by side) is measured by bench/threads.py, not asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys

from evomerge.threads import THREAD_ENV, cpus_given

PROBE = (
    "import os, sys; from evomerge.threads import configure_process; configure_process(); import torch; "
    "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
)


def _probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    run = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_defaults_sleep_and_size_torch_to_the_cpus_given():
    policy, threads, torch_threads = _probe()
    assert policy == "PASSIVE" and int(threads) == int(torch_threads) == cpus_given()


def test_an_explicit_environment_wins():
    assert _probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "1", "1"]


def test_ray_workers_get_the_same_environment(monkeypatch):
    """The runtime environment `evomerge search` starts (or joins) Ray with; workers read it before torch."""
    from types import SimpleNamespace

    import ray

    from evomerge.run.pool import start_ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    start_ray(SimpleNamespace(workers=SimpleNamespace(address=None, count=2, num_cpus=1)))
    assert seen["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == THREAD_ENV["OMP_WAIT_POLICY"] == "PASSIVE"
