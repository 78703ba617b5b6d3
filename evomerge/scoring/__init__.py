"""lm-eval scoring: task specs and the catalog that builds them once (`tasks`), a Scorer that evaluates a live
model in place (`scorer`, around lm-eval's HFLM in `lm`), and a checkpoint folder scored from disk (`model_dir`).

    from evomerge.scoring import Scorer, TaskSpec, evaluate_model_dir
    evaluate_model_dir("zoo/add", ["zoo_add", "zoo_reverse"])   # {"zoo_add": {"acc": ..., "acc_norm": ...}, ...}

A merge candidate is scored by `evomerge.candidate.evaluator`, which owns one Scorer per task set.
"""

from __future__ import annotations

from evomerge.scoring.model_dir import evaluate_model_dir, load_model_dir, sample_model_dir
from evomerge.scoring.scorer import Scorer, Scores, quiet
from evomerge.scoring.tasks import BUILTIN_TASKS, TaskCatalog, TaskSpec

__all__ = [
    "BUILTIN_TASKS",
    "Scorer",
    "Scores",
    "TaskCatalog",
    "TaskSpec",
    "evaluate_model_dir",
    "load_model_dir",
    "quiet",
    "sample_model_dir",
]
