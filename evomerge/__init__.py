"""evomerge: evolutionary merge-recipe optimizer for language models.

The flow, one package per step: `config` (the search config, validated and resolved once; the run directory)
-> `capacity` (the resource plan) -> `study` (the Optuna study: a trial asked) and `run` (the driver's loop over
a pool of workers) -> `candidate` (a trial's point as a recipe, merged by `merge` into a resident model and scored
by `scoring`, by the Evaluator) -> `refine` (gradient refinement rounds) -> `validate` (the overfitting guard)
-> `export` (checkpoint, recipe, model card) and `report`. Reading and writing files is `io`; `analysis` is the
pre-flight audit; `zoo` builds the demo models; `commands` is the CLI. docs/architecture.md has the map.
"""

from __future__ import annotations

__version__ = "0.1.0"
