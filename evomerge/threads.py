"""CPU thread discipline: each process runs torch on the CPUs it was given, and idle threads sleep.

Two torch processes on one small machine (a search beside a report, a test run beside a demo) each start
an OpenMP pool as wide as the machine, and by default an idle OpenMP thread spins for a while before it
sleeps: the spinning threads take the cores the other process needs, and every short parallel op waits for
a descheduled thread. Measured here: tenfold, not twofold, slowdowns (`bench/threads.py`). So:

- `OMP_WAIT_POLICY=PASSIVE`: waiting threads sleep at once. OpenMP reads it when torch loads it, so it
  is set before torch is imported: by `evomerge`'s CLI (`configure_process`) and in every Ray worker's
  environment (`THREAD_ENV`);
- torch's threads = the CPUs the process was given: its CPU affinity (`taskset`, a container's cpuset)
  for the CLI, `workers.num_cpus` for a Ray actor (which also gets `OMP_NUM_THREADS` from Ray).

An explicit `OMP_WAIT_POLICY` or `OMP_NUM_THREADS` in the environment wins.
"""

from __future__ import annotations

import os

THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def cpus_given() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_process() -> None:
    """Before torch is imported: sleeping idle threads, and as many threads as CPUs given."""
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus_given()))


__all__ = ["THREAD_ENV", "configure_process", "cpus_given"]
