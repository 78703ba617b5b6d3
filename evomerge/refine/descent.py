"""The refinement's one loop, shared by the per-tensor (refine/tensor.py) and the per-row (refine/rows.py) refiners:
the loss and its gradients over the micro-batches, which parameters take a gradient, and Adam within bounds.

    with gradients_for(model, moving):                     # .grad on for these parameters only, restored after
        descend([u], (0.0, 1.0), steps=60, every=10, lr=0.05,
                loss_at=lambda grad: backward(model, loss, batches, grad),
                gradient=..., write=..., keep=...)

A refiner says what it moves (the search space's slots in units of their range, or per-row multipliers), how the
merged state at those values is written into the resident model, and how the parameters' gradients become the
values' gradient; the loop is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from evomerge.refine.losses import Example, Loss, MicroBatch

BALANCE_LIMIT = 30.0  # the most a task's loss is scaled up against the task with the steepest gradient


def backward(model: torch.nn.Module, loss: Loss, batches: Sequence[MicroBatch], grad: bool) -> float:
    """The loss summed over every micro-batch; with `grad`, the parameters' gradients accumulated from zero (for
    the parameters that require one: `gradients_for`)."""
    import torch

    from evomerge.refine.losses import logits_of

    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    device = next(model.parameters()).device
    total = 0.0
    for batch in batches:
        with torch.set_grad_enabled(grad):
            value = loss(logits_of(model, batch, device), batch)
        if grad:
            value.backward()
        total += value.item()
        del value
    return total


def task_scales(
    batches: Mapping[str, Sequence[MicroBatch]], gradient_of: Callable[[Sequence[MicroBatch]], torch.Tensor]
) -> dict[str, float]:
    """Each task's loss scale for a round: the steepest task's gradient norm over this task's, at the round's
    start (`gradient_of(batches)`: the refined values' gradient of one task's loss alone), at most BALANCE_LIMIT.

    The search's objective weighs its tasks' scores as the config says, but their losses are on different scales:
    a generation task's answer of ten tokens has a summed log-likelihood with a gradient ten times a two-way
    multiple choice's, so one steepest task sets every step's direction, and a skill the merge has lost to chance
    (its loss flat around log 2) is never won back. Scaled so that each task's gradient has the same norm at the
    start, every task moves the values as much as the others (gradient normalisation across tasks); the limit keeps
    a task the merge already answers perfectly (a gradient near zero) from turning noise into a direction."""
    norms = {task: float(gradient_of(b).norm()) for task, b in batches.items()}
    top = max(norms.values(), default=0.0)
    if top == 0.0:
        return dict.fromkeys(norms, 1.0)
    return {task: min(top / n, BALANCE_LIMIT) if n > 0 else BALANCE_LIMIT for task, n in norms.items()}


def balanced(
    items: Sequence[Example],
    batch: Callable[[Sequence[Example]], list[MicroBatch]],
    gradient_of: Callable[[Sequence[MicroBatch]], torch.Tensor],
) -> list[MicroBatch]:
    """The round's micro-batches with each task's items weighted by `task_scales` (`batch`: items into
    micro-batches; its normalisation keeps the total the weighted mean of the items' losses)."""
    from dataclasses import replace

    tasks = sorted({item.task for item in items})
    if len(tasks) < 2:
        return batch(items)
    scales = task_scales({t: batch([i for i in items if i.task == t]) for t in tasks}, gradient_of)
    return batch([replace(item, weight=item.weight * scales[item.task]) for item in items])  # type: ignore[type-var]


@contextmanager
def gradients_for(model: torch.nn.Module, moving: Collection[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients on for the `moving` parameters, off for the rest; after, every flag back as it was and every
    gradient dropped (its memory given back)."""
    before = {p: p.requires_grad for p in model.parameters()}
    for p in before:
        p.requires_grad_(p in moving)
    try:
        yield
    finally:
        for p, flag in before.items():
            p.grad = None
            p.requires_grad_(flag)


def descend(
    values: Sequence[torch.Tensor],
    bounds: tuple[float, float],
    *,
    steps: int,
    every: int,
    lr: float,
    loss_at: Callable[[bool], float],
    gradient: Callable[[], Sequence[torch.Tensor]],
    write: Callable[[], None],
    keep: Callable[[int, float], None],
    progress: Callable[[int, float, bool], None] | None = None,
) -> None:
    """Adam on `values` (changed in place, each element clamped to `bounds` after every step), from the state the
    resident model holds now. At each step `loss_at(grad)` gives the loss there (with the parameters' gradients
    unless it is the last step), `keep(step, loss)` records every `every` steps and the last, `progress(step, loss,
    kept)` hears of every step (the driver's progress line), `gradient()` gives d loss / d values, and after the step
    `write()` puts the merge at the new values into the resident model."""
    import torch

    opt = torch.optim.Adam(list(values), lr=lr)
    for step in range(steps + 1):
        last = step == steps
        loss = loss_at(not last)
        kept = step % every == 0 or last
        if kept:
            keep(step, loss)
        if progress:
            progress(step, loss, kept)
        if last:
            return
        for value, grad in zip(values, gradient()):
            value.grad = grad
        opt.step()
        with torch.no_grad():
            for value in values:
                value.clamp_(*bounds)
        write()


__all__ = ["BALANCE_LIMIT", "backward", "balanced", "descend", "gradients_for", "task_scales"]
