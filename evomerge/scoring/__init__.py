"""lm-eval scoring: tasks built once, live models scored in place, checkpoints scored from disk.

    from evomerge.scoring import Scorer, TaskSpec, evaluate_model_dir
    evaluate_model_dir("zoo/add", ["zoo_add", "zoo_reverse"])   # {"zoo_add": {"acc": ..., "acc_norm": ...}, ...}
"""
from __future__ import annotations

from evomerge.scoring.checkpoint import evaluate_model_dir, load_checkpoint
from evomerge.scoring.scorer import Scorer, Scores, quiet
from evomerge.scoring.tasks import BUILTIN_TASKS, TaskCatalog, TaskSpec

__all__ = [
    "BUILTIN_TASKS",
    "Scorer",
    "Scores",
    "TaskCatalog",
    "TaskSpec",
    "evaluate_model_dir",
    "load_checkpoint",
    "quiet",
]
