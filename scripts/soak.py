"""Crash-and-resume soak: SIGKILL `evomerge search` at random moments, resume it with the same command, check the study.

    .venv/bin/python scripts/soak.py --kills 30 [--zoo /tmp/szoo/tiny] [--budget 60] [--seed 0] [--workdir DIR]

The search runs in-process (`workers.count: 0`, no Ray) on the tiny zoo with tiny subsets. Each life of the
driver is killed either early (at a random moment after it took the study's lock: opening the study, failing
stale trials, loading the models) or late (a random moment after it started a trial: merging, scoring,
telling). Then one last run finishes the budget, and the study is checked:

- complete: exactly the budget of COMPLETE trials;
- lost: a trial seen COMPLETE after some kill that is no longer COMPLETE with the same params and values,
  a baseline with no COMPLETE trial, a requeued trial (FAIL "stale:"/"interrupted:"/"worker died") with
  no retry, or a retry that completed with other params than the trial it retries;
- duplicated: two COMPLETE trials that are runs of one enqueued params set (the same root of their `retry_of`
  chain: one baseline label or one sampled trial), or a trial retried more than once;
- stuck: RUNNING or WAITING trials left after the final run;
- integrity: SQLite `PRAGMA integrity_check`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
REQUEUED = ("stale:", "interrupted:", "worker died")


@dataclass
class SoakReport:
    kills: int = 0
    early: int = 0  # kills before this life started a trial
    late: int = 0
    budget: int = 0
    complete: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # lives that exited on their own with an error
    integrity: str = ""
    final_rc: int | None = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.complete == self.budget
            and not (self.lost or self.duplicated or self.stuck or self.crashes)
            and self.integrity == "ok"
            and self.final_rc == 0
        )

    def text(self) -> str:
        return "\n".join(
            [
                f"kills survived:   {self.kills} ({self.early} early, {self.late} mid-trial)",
                f"trials completed: {self.complete} of budget {self.budget} ({self.failed} FAIL, requeued or failed)",
                f"lost:             {len(self.lost)} {self.lost[:5] or ''}",
                f"duplicated:       {len(self.duplicated)} {self.duplicated[:5] or ''}",
                f"stuck:            {len(self.stuck)} {self.stuck[:5] or ''}",
                f"crashed lives:    {len(self.crashes)} {self.crashes[:3] or ''}",
                f"integrity_check:  {self.integrity}",
                f"final run rc:     {self.final_rc}; wall {self.wall_s:.0f} s",
            ]
        )


def write_config(workdir: Path, zoo: Path, budget: int, sampler: str = "cmaes") -> Path:
    data = {
        "name": "soak",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {
            "methods": ["task_arithmetic"],
            "layers_per_group": 2,
            "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}, "lambda": {"value": 1.0}},
        },
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}]},
        "sampler": {"name": sampler, "options": {"popsize": 4} if sampler == "cmaes" else {}},
        "budget": {"n_trials": budget},
        "workers": {"count": 0},
    }
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, timeout=60)


def read_trials(db: Path) -> dict[int, dict]:
    """number -> {state, params, values, attrs}, read with plain sqlite (never through Optuna's caches)."""
    if not db.exists():
        return {}
    try:
        with _connect(db) as conn:
            rows = conn.execute("SELECT trial_id, number, state, datetime_start FROM trials").fetchall()
            params = conn.execute("SELECT trial_id, param_name, param_value FROM trial_params").fetchall()
            values = conn.execute("SELECT trial_id, objective, value FROM trial_values").fetchall()
            attrs = conn.execute("SELECT trial_id, key, value_json FROM trial_user_attributes").fetchall()
            fixed = conn.execute(
                "SELECT trial_id, value_json FROM trial_system_attributes WHERE key = 'fixed_params'"
            ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    by_id = {
        tid: {"number": n, "state": s, "start": start, "params": {}, "values": {}, "attrs": {}, "fixed": {}}
        for tid, n, s, start in rows
    }
    for tid, value in fixed:
        by_id[tid]["fixed"] = json.loads(value)
    for tid, name, value in params:
        by_id[tid]["params"][name] = value
    for tid, objective, value in values:
        by_id[tid]["values"][objective] = value
    for tid, key, value in attrs:
        if key in ("retry_of", "baseline", "fail_reason", "driver"):
            by_id[tid]["attrs"][key] = json.loads(value)
    return {t["number"]: t for t in by_id.values()}


def _root(trials: dict[int, dict], number: int) -> str:
    seen = set()
    while "retry_of" in trials[number]["attrs"] and number not in seen:
        seen.add(number)
        number = trials[number]["attrs"]["retry_of"]
    label = trials[number]["attrs"].get("baseline")
    return f"baseline {label!r}" if label else f"trial {number}"


def check(db: Path, observed: dict[int, tuple], report: SoakReport) -> None:
    """Fill the report's complete/lost/duplicated/stuck/integrity figures from the study after the final run."""
    trials = read_trials(db)
    done = {n: t for n, t in trials.items() if t["state"] == "COMPLETE"}
    report.complete, report.failed = len(done), sum(t["state"] == "FAIL" for t in trials.values())
    for number, seen in sorted(observed.items()):
        if number not in done or (done[number]["params"], done[number]["values"]) != seen:
            report.lost.append(f"trial {number} was COMPLETE, now {trials.get(number, {}).get('state')}")
    roots: dict[str, list[int]] = {}
    for number in done:
        roots.setdefault(_root(trials, number), []).append(number)
    report.duplicated += [f"{root}: COMPLETE as {nums}" for root, nums in roots.items() if len(nums) > 1]
    labels = {t["attrs"]["baseline"] for t in trials.values() if "baseline" in t["attrs"]}
    report.lost += [
        f"baseline {label!r} never completed" for label in sorted(labels) if f"baseline {label!r}" not in roots
    ]
    for number, t in sorted(trials.items()):
        retries = [n for n, r in trials.items() if r["attrs"].get("retry_of") == number]
        if t["state"] == "FAIL" and str(t["attrs"].get("fail_reason", "")).startswith(REQUEUED) and not retries:
            report.lost.append(f"trial {number} ({t['attrs']['fail_reason'][:60]}) was never retried")
        parent = trials.get(t["attrs"].get("retry_of"))
        known = {**parent["fixed"], **parent["params"]} if parent else {}
        if t["state"] == "COMPLETE" and any(t["params"].get(k) != v for k, v in known.items()):
            report.lost.append(f"trial {number} retried trial {t['attrs']['retry_of']} with other params")
        if len(retries) > 1:
            report.duplicated.append(f"trial {number} retried {len(retries)} times: {retries}")
        if t["state"] in ("RUNNING", "WAITING"):
            report.stuck.append(f"trial {number} {t['state']}")
    with _connect(db) as conn:
        report.integrity = ";".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())


def _started_since(db: Path, since: str) -> bool:
    try:
        with _connect(db) as conn:
            return (
                conn.execute("SELECT 1 FROM trials WHERE datetime_start >= ? LIMIT 1", (since,)).fetchone() is not None
            )
    except sqlite3.OperationalError:
        return False


def _holds_lock(lock: Path, pid: int) -> bool:
    try:
        return f"'pid': {pid}," in lock.read_text()
    except OSError:
        return False


def run_soak(
    workdir: Path,
    zoo: Path,
    kills: int,
    budget: int,
    seed: int = 0,
    sampler: str = "cmaes",
    early_share: float = 0.3,
    late_max_s: float = 5.0,
    log=print,
) -> SoakReport:
    """Kill the search `kills` times (or until it finishes), resume it to the end, and check the study."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir, zoo, budget, sampler)
    cmd = [sys.executable, "-m", "evomerge", "search", str(config), "--no-progress"]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    db, lock = workdir / "runs" / "soak" / "study.db", workdir / "runs" / "soak" / "study.db.soak.lock"
    rng, report, observed = random.Random(seed), SoakReport(budget=budget), {}
    start = time.monotonic()
    with open(workdir / "lives.log", "ab") as out:
        while report.kills < kills:
            since = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
            early = int((report.kills + 1) * early_share) > int(report.kills * early_share)  # evenly spread
            try:
                while proc.poll() is None and not (_holds_lock(lock, proc.pid) if early else _started_since(db, since)):
                    time.sleep(0.1)
                if proc.poll() is None:
                    time.sleep(rng.uniform(0, 3.0 if early else late_max_s))
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if proc.returncode != -signal.SIGKILL:
                if proc.returncode != 0:
                    report.crashes.append(
                        f"life {report.kills + 1} exited with {proc.returncode} (see {workdir / 'lives.log'})"
                    )
                break  # it finished (or crashed) before the kill
            report.kills += 1
            report.early += early
            report.late += not early
            trials = read_trials(db)
            for number, t in trials.items():
                if t["state"] == "COMPLETE":
                    observed.setdefault(number, (t["params"], t["values"]))
            if log:
                n_done = sum(t["state"] == "COMPLETE" for t in trials.values())
                log(
                    f"kill {report.kills:3d} ({'early' if early else 'late '}): {n_done}/{budget} complete, "
                    f"{len(trials)} trials"
                )
        final = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    report.final_rc = final.returncode
    check(db, observed, report)
    report.wall_s = time.monotonic() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs of the driver (at most 100)")
    parser.add_argument(
        "--budget", type=int, default=None, help="COMPLETE trials the study ends with (default: 2 x kills, at least 12)"
    )
    parser.add_argument("--zoo", type=Path, default=None, help="a tiny zoo (default: build one in the work dir)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the run goes (default: a new temp dir)")
    parser.add_argument("--sampler", default="cmaes", choices=["cmaes", "random", "tpe"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.kills <= 100:
        parser.error("--kills must be 1..100")
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="evomerge-soak-"))
    zoo = args.zoo
    if zoo is None:
        sys.path.insert(0, str(REPO))
        from evomerge.zoo.build import build_zoo

        zoo = workdir / "zoo"
        if not (zoo / "zoo.json").is_file():
            build_zoo(zoo, seed=0, size="tiny", log=None)
    report = run_soak(
        workdir, zoo.resolve(), args.kills, args.budget or max(12, 2 * args.kills), args.seed, args.sampler
    )
    print(report.text())
    print(f"work dir: {workdir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
