"""Opening a new study storage from several processes at the same moment: every one succeeds (issue 17).

A fresh clone's `make test` once failed because a test polled a study database while the search that made it was
still creating Optuna's schema; a user who runs `evomerge status` the moment a search starts, or two drivers on a
shared PostgreSQL database, race the same way. Four processes open each of 20 fresh databases at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.study.storage import schema_race

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
RACERS = 4
ROUNDS = 20


def race(urls: list[str], tmp_path: Path) -> dict[int, list[str]]:
    """Start RACERS processes, let each open every URL at the same moment; {round: [each racer's result]}."""
    sync = tmp_path / "sync"
    sync.mkdir()
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("\n".join(urls))
    cmd = [sys.executable, str(REPO / "tests" / "schema_racer.py"), str(urls_file)]
    procs = [
        subprocess.Popen(
            [*cmd, str(i), str(sync)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(RACERS)
    ]

    def wait(paths: list[Path]) -> None:
        deadline = time.monotonic() + 300  # generous: four Python processes on a loaded 2-core machine
        while not all(p.exists() for p in paths):
            for proc in procs:
                if proc.poll() is not None and proc.returncode != 0:
                    raise AssertionError(f"a racer exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
            assert time.monotonic() < deadline, f"timed out waiting for {[p.name for p in paths if not p.exists()]}"
            time.sleep(0.01)

    try:
        wait([sync / f"ready-{i}" for i in range(RACERS)])
        results = {}
        for k in range(len(urls)):
            (sync / f"go-{k}").touch()
            done = [sync / f"result-{k}-{i}" for i in range(RACERS)]
            wait(done)
            results[k] = [p.read_text() for p in done]
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def check(results: dict[int, list[str]]) -> None:
    failed = {k: r for k, r in results.items() if any(x != "ok" for x in r)}
    assert not failed, f"{len(failed)} of {len(results)} rounds had a failure, e.g. {next(iter(failed.values()))}"


def test_processes_opening_a_new_sqlite_storage_at_once_all_succeed(tmp_path):
    urls = [f"sqlite:///{tmp_path / f'round{k}' / 'study.db'}" for k in range(ROUNDS)]
    check(race(urls, tmp_path))


def test_processes_opening_a_new_postgres_storage_at_once_all_succeed(postgres, tmp_path):
    urls = [postgres.url(postgres.database()) for _ in range(ROUNDS)]
    check(race(urls, tmp_path))


@pytest.mark.parametrize(
    "message, race",
    [
        ("(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num", True),
        ("(sqlite3.OperationalError) table studies already exists", True),
        ('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "pg_type_typname"', True),
        ("(sqlite3.OperationalError) database is locked", True),
        ("(psycopg.OperationalError) connection refused", False),
        ("(sqlite3.OperationalError) unable to open database file", False),
    ],
)
def test_only_the_errors_of_concurrent_schema_creation_are_retried(message, race):
    from sqlalchemy.exc import IntegrityError, OperationalError

    kind = IntegrityError if "Integrity" in message or "Unique" in message else OperationalError
    assert schema_race(kind(message, None, Exception(message))) is race
