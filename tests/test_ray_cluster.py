"""Ray for real: a search that joins a Ray cluster started with `ray start --head` (its node runs the installed
wheel, as a cluster node with `pip install evomerge` does), two workers each running one trial at a time, a
worker with another evomerge version refused, and a worker SIGKILLed mid-trial whose trial another worker retries.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from installed import clean_env, site_packages

import evomerge
from evomerge.config.schema import parse_config
from evomerge.errors import ConfigError, ModelError
from evomerge.run.driver import run_search
from evomerge.run.pool import WorkerPool
from evomerge.study.storage import load_study

pytestmark = pytest.mark.timeout(300)  # a hung Ray fails its test; the cluster fixture still stops the cluster

TASKS = [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}]
SPACE = {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}}}


def config(zoo: Path, **changes):
    return parse_config(
        {
            "name": "cluster",
            "base_model": str(zoo / "base"),
            "models": [str(zoo / "add"), str(zoo / "reverse")],
            "method": "task_arithmetic",
            "search_space": SPACE,
            "tasks": {"search": TASKS},
            "sampler": {"name": "random"},
            "budget": {"n_trials": 6},
            "refine": None,  # the trials counted here are the sampler's, each run once on a worker
            "portfolio": False,
            **changes,
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, installed_evomerge):
    """A one-node Ray cluster as `ray start --head` makes it (2 CPUs: this machine's), whose Python is the fresh
    environment with the wheel installed. Ray's fixed default ports are moved to free ones, so the cluster lives
    beside other Ray instances on this machine; it is stopped by terminating the `ray start --block` process
    (what `ray stop` does, but to this cluster only: `ray stop` stops every Ray on the machine)."""
    temp = tmp_path_factory.mktemp("ray")
    if len(str(temp)) > 40:  # Ray's socket paths (temp/session_<date>_<pid>/sockets/plasma_store) must fit in 107 bytes
        temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    python = installed_evomerge / "bin" / "python"
    cmd = [
        str(python),
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--disable-usage-stats",
        "--include-dashboard",
        "false",
        "--temp-dir",
        str(temp),
        "--object-store-memory",
        str(100 * 2**20),
        "--dashboard-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
    ]
    # Ray's token authentication, as on a real cluster: the head and every client present one token, the test
    # session's (RAY_AUTH_TOKEN, set in conftest.py), in the environment `clean_env` passes on
    log = temp / "ray_start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=clean_env(RAY_AUTH_MODE="token"),
        )
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield {
            "address": f"127.0.0.1:{port}",
            "pid": proc.pid,
            "python": python,
            "env": installed_evomerge,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever it left behind (its own process group: only processes it started)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not str(temp).startswith(str(tmp_path_factory.getbasetemp())):
            shutil.rmtree(temp, ignore_errors=True)


class RecordingPool:
    """The pool the driver uses, keeping every JobResult it hands back (worker-side start and end times) and,
    at each wait, how many workers had a trial to run (each slot's queue holds the trials sent to its actor)."""

    def __init__(self, pool):
        self.pool, self.results, self.infos, self.busy = pool, [], list(pool.infos), []

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def wait(self, timeout=None):
        self.busy.append(sum(1 for queue in self.pool.queues if queue))
        out = self.pool.wait(timeout)
        self.results += [res for _, res in out]
        return out


def test_a_search_on_a_ray_cluster_runs_two_workers_each_one_trial_at_a_time(
    tmp_path, tiny_zoo, monkeypatch, ray_cluster
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # `ray start` turned token auth on, with the session's token
    cfg = config(tiny_zoo, workers={"count": 2, "num_cpus": 1, "address": ray_cluster["address"]})
    seen = {}

    def factory(c):
        pool = RecordingPool(WorkerPool(c))
        seen["pool"] = pool
        seen["cluster_pids"] = {p.pid for p in psutil.Process(ray_cluster["pid"]).children(recursive=True)}
        return pool

    result = run_search(cfg, progress=False, log=None, pool_factory=factory)
    assert result.n_complete == 6 and result.n_failed == 0
    pool = seen["pool"]

    # the workers are the cluster's processes, in its node's Python, importing the evomerge installed there
    package = site_packages(ray_cluster["env"]) / "evomerge"
    assert len(pool.infos) == 2 and len({i["name"] for i in pool.infos}) == 2
    for info in pool.infos:
        assert int(info["name"].rsplit(":", 1)[1]) in seen["cluster_pids"], "an actor outside the cluster"
        assert Path(info["python"]) == ray_cluster["python"]
        assert Path(info["package"]) == package and info["version"] == evomerge.__version__

    # both ran trials; neither ever ran two at once; the driver gave both work at the same time (whether their
    # runs then overlap in time is up to the machine's scheduler: on a loaded machine one may finish first)
    trials = load_study("cluster", cfg.storage_url).trials
    assert {t.user_attrs["worker"] for t in trials} == {i["name"] for i in pool.infos}
    spans = {}
    for res in pool.results:
        spans.setdefault(res.worker, []).append((res.started, res.ended))
    assert sum(len(s) for s in spans.values()) == 6
    for worker, own in spans.items():
        own.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(own, own[1:])), f"{worker} ran two trials at once: {own}"
    assert max(pool.busy) == 2, f"the two workers never had trials at the same time: {pool.busy}"


def test_a_cluster_worker_with_another_evomerge_version_is_refused(tmp_path, tiny_zoo, monkeypatch, ray_cluster):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    installed = evomerge.__version__  # the node's (the wheel built from this tree)
    monkeypatch.setattr(evomerge, "__version__", "0.0.1+driver")
    cfg = config(tiny_zoo, workers={"count": 1, "num_cpus": 1, "address": ray_cluster["address"]})
    with pytest.raises(
        ConfigError, match=rf"runs evomerge {re.escape(installed)} .* but the driver runs 0\.0\.1\+driver; install"
    ):
        WorkerPool(cfg)


def test_a_cluster_node_without_the_models_is_a_user_error_naming_the_path(
    tmp_path, tiny_zoo, monkeypatch, ray_cluster
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    missing = tmp_path / "not-on-this-node" / "add"
    cfg = config(tiny_zoo, workers={"count": 1, "num_cpus": 1, "address": ray_cluster["address"]})
    cfg = cfg.model_copy(update={"models": [missing, tiny_zoo / "reverse"]})
    with pytest.raises(ModelError, match=f"{missing}: model folder"):
        WorkerPool(cfg)


def test_an_address_with_no_cluster_is_a_user_error(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(tiny_zoo, workers={"count": 1, "address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(
        ConfigError, match=r"workers\.address: cannot join the Ray cluster at '127\.0\.0\.1:\d+' \(nothing answers"
    ):
        WorkerPool(cfg)
    import ray

    assert not ray.is_initialized()


@pytest.mark.slow  # ~20 s: Ray retries a refused token that long before it gives up
def test_a_driver_without_the_clusters_token_is_told_what_to_set(tmp_path, tiny_zoo, ray_cluster):
    """In a process of its own: Ray keeps its auth mode per process, and other tests here turned it on."""
    cfg = config(tiny_zoo, workers={"count": 1, "num_cpus": 1, "address": ray_cluster["address"]})
    script = (
        "import sys\n"
        "from evomerge.config.schema import parse_config\n"
        "from evomerge.errors import ConfigError\n"
        "from evomerge.run.pool import WorkerPool\n"
        f"cfg = parse_config({cfg.model_dump(mode='json', exclude_none=True)!r})\n"
        "try:\n"
        "    WorkerPool(cfg)\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "    sys.exit(2)\n"
    )
    env = {k: v for k, v in clean_env().items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "workers.address: cannot join the Ray cluster" in out.stdout and "RAY_AUTH_MODE=token" in out.stdout, (
        out.stdout
    )


class KillingPool(RecordingPool):
    """SIGKILLs slot 0's actor at the driver's `at`-th wait, while it runs a trial."""

    def __init__(self, pool, at: int):
        super().__init__(pool)
        self.at, self.waits, self.killed = at, 0, None

    def wait(self, timeout=None):
        self.waits += 1
        if self.waits == self.at:
            self.killed = (self.pool.names[0], self.pool.names[1])  # (the victim, the survivor)
            deadline = time.monotonic() + 30
            while not self.pool.queues[0] and time.monotonic() < deadline:  # it has a trial (running, or next)
                time.sleep(0.01)
            os.kill(self.pool.pids[0], signal.SIGKILL)
        return super().wait(timeout)


def test_a_worker_killed_mid_trial_is_retried_on_the_other_worker(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(tiny_zoo, workers={"count": 2, "num_cpus": 1})  # a local Ray, 2 CPUs
    seen = {}

    def factory(c):
        seen["pool"] = KillingPool(WorkerPool(c), at=3)
        return seen["pool"]

    result = run_search(cfg, progress=False, log=None, pool_factory=factory)
    victim, survivor = seen["pool"].killed
    trials = load_study("cluster", cfg.storage_url).trials
    assert result.n_complete == 6 and {t.state.name for t in trials} <= {"COMPLETE", "FAIL"}
    dead = [t for t in trials if t.state.name == "FAIL"]
    assert dead and all(t.user_attrs["fail_reason"].startswith(f"worker died: {victim}") for t in dead)
    assert len([t for t in trials if t.user_attrs.get("worker_deaths")]) == 1, "only the running trial is charged"
    for t in dead:  # each retried once, same params, completed by the worker that lived, not the one that died
        (retry,) = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert retry.params == t.params and retry.state.name == "COMPLETE"
        assert retry.user_attrs["worker"] == survivor, (retry.user_attrs["worker"], victim, survivor)
