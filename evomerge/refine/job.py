"""What the driver hands a worker for one refinement round, and what comes back: the one seam between the search
loop (run/driver.py) and the refiners (refine/tensor.py per tensor, refine/rows.py per row).

    job = RefineJob(arm="rows", steps=60, every=10, lr=0.05, coefficients=start_multipliers, balance=True)
    path = pool.refine(best.params, job)          # [PathPoint(step, point, loss, coefficients), ...]

Both cross Ray (pickled), so they hold plain values and tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Arm = Literal["tensor", "rows", "distill"]


@dataclass(frozen=True)
class RefineJob:
    """One round: its arm (config.RefineConfig.arms), its schedule, and where a per-row round starts."""

    arm: Arm
    steps: int
    every: int
    lr: float
    examples: int | None = None  # examples per task the gradient sees (None: each task's search subset)
    coefficients: dict[str, torch.Tensor] | None = None  # rows, distill: the start trial's multipliers (None: 1)
    row_lr: float | None = None  # rows, distill: the coefficients' step (None: rows.row_step's choice)
    balance: bool = True  # each task's loss scaled to an equal gradient at the start (descent.task_scales)

    @property
    def per_row(self) -> bool:
        return self.arm != "tensor"

    @property
    def loss(self) -> Literal["likelihood", "distill"]:
        """The per-row refiner's loss (refine/rows.py LOSSES)."""
        return "distill" if self.arm == "distill" else "likelihood"


@dataclass(frozen=True)
class PathPoint:
    """One point of a round's path: its step, the search-space point, the surrogate loss there and, for a per-row
    round, the multipliers (file keys of merge/coefficients.py)."""

    step: int
    point: dict[str, float]
    loss: float
    coefficients: dict[str, torch.Tensor] | None = None


__all__ = ["Arm", "PathPoint", "RefineJob"]
