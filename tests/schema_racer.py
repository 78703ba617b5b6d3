"""One of several processes opening the same new study storages at the same moment (tests/test_storage_open.py).

    python tests/schema_racer.py URLS_FILE ME SYNC_DIR

Once imported it writes `ready-<me>`; then for each URL (one line of URLS_FILE, a fresh database each) it waits
for `go-<round>`, opens the storage and creates (or loads) the study `raced` as `evomerge search` and
`evomerge status` do, and writes `result-<round>-<me>`: `ok`, or `error <message>`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(urls_file: Path, me: str, sync: Path) -> None:
    import optuna

    from evomerge.errors import EvomergeError
    from evomerge.storage_url import remember
    from evomerge.study.storage import get_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    urls = urls_file.read_text().split()
    (sync / f"ready-{me}").touch()
    for k, url in enumerate(urls):
        go = sync / f"go-{k}"
        while not go.exists():  # spin: every racer starts the round within a millisecond of the others
            time.sleep(0.0005)
        try:
            storage = get_storage(remember(url))
            optuna.create_study(study_name="raced", storage=storage, load_if_exists=True)
            result = "ok"
        except EvomergeError as err:
            result = f"error {err}"
        tmp = sync / f".result-{k}-{me}"
        tmp.write_text(result)
        tmp.rename(sync / f"result-{k}-{me}")  # whole when it appears: the test reads it as soon as it exists


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
