"""The search run: the driver (`driver`: ask, submit, wait, tell), the pools that evaluate candidates (`pool`:
the one module that imports Ray, a `Pool` protocol over the in-process and the Ray pools). What the budget buys
(the refinement rounds' schedule) is the plan's: `evomerge.capacity.schedule`.

    from evomerge.config.schema import load_config
    from evomerge.run.driver import run_search
    run_search(load_config("configs/demo.yaml"))      # or resume: the same call continues the study

Import from the modules; this package imports nothing itself."""
