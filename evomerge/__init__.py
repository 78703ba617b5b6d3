"""evomerge: evolutionary merge-recipe optimizer for language models.

The flow, one module per step: `config` (the search config, validated once) -> `space` (a trial's point <->
a recipe) -> `search` (Optuna asks a trial, `run.pool` hands it to a worker) -> `recipe` -> `merge`
(materialized into a resident model) -> `scoring` (lm-eval), both run by `evaluator` -> `export` (checkpoint,
recipe, model card) -> `report`. Reading and writing files is `io`; `analysis` is the pre-flight audit;
`zoo` builds the demo models; `commands` is the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"
