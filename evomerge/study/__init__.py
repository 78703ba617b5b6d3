"""The Optuna layer only, by concern (Optuna is imported only inside these modules' functions):

- `storage`: a URL -> an Optuna storage (engine, schema creation, its concurrent-creation retry), studies by name.
- `lock`: one driver per study (`server_lock`: its PostgreSQL advisory lock / MySQL GET_LOCK).
- `samplers`: samplers by name (the registry a config validates against), their defaults, warm start.
- `record`: what a trial and a study store (typed user attributes), the only place that names their keys.
- `trials`: queries over a study's trials and the one ranking (best trial, top trials, Pareto front).
- `study`: create or resume a study, the baselines, ask / fail / requeue, stale trials.

Import each name from the module that defines it; this package imports nothing itself."""
