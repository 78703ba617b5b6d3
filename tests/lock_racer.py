"""One of two drivers racing for a study's lock, `rounds` times (tests/test_postgres.py starts two at once).

    python tests/lock_racer.py URL STUDY ROUNDS ME SYNC_DIR

Each round both write `ready-<round>-<me>` and wait for the other's, then take the lock as `evomerge search`
does (StudyLock.acquire, then claim on the Optuna study). The winner holds it until the loser has written its
result, so each round is one contest; each writes `result-<round>-<me>`: `won <pid>` or `lost <message>`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)


def main(url: str, study_name: str, rounds: int, me: str, sync: Path) -> None:
    import os

    import optuna

    from evomerge.errors import StudyError
    from evomerge.storage_url import remember
    from evomerge.study.lock import StudyLock
    from evomerge.study.storage import get_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = remember(url)  # as a config does: the password masked, kept in memory
    storage = get_storage(url)
    other = "b" if me == "a" else "a"
    for k in range(rounds):
        (sync / f"ready-{k}-{me}").touch()
        wait_for(sync / f"ready-{k}-{other}")
        lock = StudyLock(url, study_name)
        try:
            lock.acquire()
        except StudyError as err:
            (sync / f"result-{k}-{me}").write_text(f"lost {err}")
            continue
        study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True)
        lock.claim(study)
        (sync / f"result-{k}-{me}").write_text(f"won {os.getpid()}")
        wait_for(sync / f"result-{k}-{other}")
        lock.release()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
