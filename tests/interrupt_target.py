"""A process that writes to its Optuna study as fast as it can and is interrupted again and again
(tests/test_interrupts.py sends it SIGTERM and SIGINT at random moments).

    python tests/interrupt_target.py DB ROUNDS

With evomerge's handlers installed (evomerge.interrupts, as the CLI installs them), each signal raises
`Interrupted` outside any database call; the process then does what a search's clean-up does, writes to the same
study from the same thread and reads it back, and prints one JSON line per signal: the modules on the
interruption's traceback and whether the clean-up write worked.
"""

from __future__ import annotations

import json
import sys
import traceback


def main(db: str, rounds: int) -> None:
    import optuna

    from evomerge import interrupts
    from evomerge.errors import Interrupted
    from evomerge.study.storage import get_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    interrupts.install()
    study = optuna.create_study(study_name="busy", storage=get_storage(f"sqlite:///{db}"))
    trial = study.ask()
    done, n, answer = 0, 0, "ready"  # printed inside the try, as every answer: a signal may follow at once
    while done < rounds:
        try:
            if answer is not None:  # answered from inside the try: the next signal finds the loop ready for it
                print(answer, flush=True)
                answer = None
            while True:  # nearly all of the time inside SQLAlchemy and sqlite3
                n += 1
                trial.set_user_attr("n", n)
        except Interrupted as exc:
            modules = [f.f_globals.get("__name__", "") for f, _ in traceback.walk_tb(exc.__traceback__)]
            try:
                study.set_user_attr(f"cleanup-{done}", n)  # the search's clean-up: same process, same thread
                ok = study.user_attrs[f"cleanup-{done}"] == n
                error = ""
            except Exception as err:  # what the bug looked like: "database is locked", a closed cursor
                ok, error = False, f"{type(err).__name__}: {err}"[:300]
            answer = json.dumps({"signal": exc.signal_name, "modules": modules, "ok": ok, "error": error})
            done += 1
    print(answer, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
