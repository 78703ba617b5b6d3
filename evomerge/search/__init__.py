"""The recipe search: an Optuna study driven by ask/tell over a pool of workers, and the guard before export.

    from evomerge.config import load_config
    from evomerge.search.driver import run_search
    run_search(load_config("configs/demo.yaml"))      # or resume: the same call continues the study

The Optuna layer, by concern (Optuna is imported only inside these modules' functions):

- `storage`: a URL -> an Optuna storage (engine, schema creation, its concurrent-creation retry), studies by name.
- `lock`: one driver per study (`server_lock`: its PostgreSQL advisory lock / MySQL GET_LOCK).
- `samplers`: samplers by name (the registry a config validates against), their defaults, warm start.
- `record`: what a trial and a study store (typed user attributes), the only place that names their keys.
- `trials`: queries over a study's trials and the one ranking (best trial, top trials, Pareto front).
- `study`: create or resume a study, the baselines, ask / fail / requeue, stale trials; re-exports the above.

And around it:

- `workers`: the one module that imports Ray: pools of candidate evaluators (`evomerge.evaluator`).
- `driver`: the loop (ask, submit, wait, tell), the portfolio and refinement rounds, its failure policy.
- `refine`: the gradient refinement. `guard`: the overfitting guard, and THE exported trial (`exported_trial`).

Import from the modules; this package imports nothing itself.
"""
