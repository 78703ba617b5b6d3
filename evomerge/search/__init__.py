"""The recipe search: an Optuna study driven by ask/tell over a pool of workers, and the guard before export.

    from evomerge.config import load_config
    from evomerge.search.driver import run_search
    run_search(load_config("configs/demo.yaml"))      # or resume: the same call continues the study

- `study`: the one module that imports Optuna: storage, create or resume a study, samplers by name, warm
  start, ask/tell bookkeeping, stale trials, best trial and Pareto front.
- `lock`: one driver per study (`server_lock`: its PostgreSQL advisory lock / MySQL GET_LOCK).
- `workers`: the one module that imports Ray: pools of candidate evaluators (`evomerge.evaluator`).
- `driver`: the loop (ask, submit, tell), its progress bar and failure policy.
- `guard`: the overfitting guard, and THE exported trial (`exported_trial`).

Import from the modules; this package imports nothing itself.
"""
