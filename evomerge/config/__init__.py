"""The config: the schema (`schema`: pydantic models, data only), its resolution into the one runnable config
that search, `audit --plan` and the benches share (`resolve`), and the run directory it names (`rundir`).

Import from the modules; this package imports nothing itself."""
