"""Gradient refinement of a recipe's weights (AdaMerging-style, supervised on the search subsets).

    refiner = Refiner(materializer, scorer, space, models, base, method, seed=0)
    path = refiner.run(point, steps=60, every=10)      # [(step, point, loss)], points in the space's coordinates
    loss, grad = refiner.gradient(point)               # one evaluation: dL/d(each refined slot) at `point`

A sampler treats a candidate as a black box: one score per merge. But for the task-arithmetic family the merged
weights are a smooth function of the per-group `weight` and `lambda` values, and for loglikelihood and
multiple-choice tasks (and the reference answers of generation tasks) the answer's log-likelihood is a smooth
function of the weights, so its gradient with respect to every searched weight comes from one backward pass.
`Refiner` follows that gradient (Adam, each value kept inside its search bounds, in units of its range) from a
point of the search space and returns the points it passes; the search then merges and scores each of them
exactly like any trial, so the surrogate below only proposes, it never decides.

The surrogate is the method's formula with everything but the weights frozen at the starting point: task
vectors sparsified once at the starting densities (evomerge-1's masks: the ones a trial with these densities
and the search's seed is merged with), the sign-consensus mask recomputed each step without gradient,
normalisation and lambda as the recipe resolves them. Densities, `t` and other parameters are not moved.
Methods outside the family (slerp, nuslerp, model_stock, passthrough) and tasks whose answers cannot be scored
by likelihood are refused with a ConfigError naming them.

One step, within the resident model's memory:
1. the surrogate's merged state at the current point is written into the resident model, tensor by tensor, in
   chunks from the memory-mapped inputs (refine/differentiable.py), as a merge does;
2. one forward and backward pass of the resident model over the training items, in micro-batches of at most
   `micro_batch_tokens` positions with gradient accumulation, gives G = dL/d theta for every merged parameter
   that the refined slots move (their `.grad`: at most one model's size); the loss is pluggable (objective.py);
3. tensor by tensor, chunk by chunk, the inner products of G with each model's (masked, normalised) task vector
   give dL/dw_i and dL/dlambda per tensor (surrogate.py has the derivative), and the space's affine map from a
   point to per-tensor values (`_linear_map`) gives dL/d(slot);
4. Adam on the slots, clamped to their bounds (the loop of refine/descent.py, which the per-row refinement,
   refine/rows.py, shares).

Extra memory of a refinement (footprint.refine_extra_bytes, what the resource plan budgets), on the resident model's
device, over the resident model and the inputs' pages a merge already touches:

    extra = P                                 the gradient: bytes of the parameters the refined slots move (the
                                              whole model, P = model bytes, when every tensor kind is searched)
          + P_max                             the largest of them again: from the second micro-batch on, each
                                              parameter's gradient is computed, then added into its `.grad`
          + N * (L * (8h + 2kv + 4i) + 3h) * b  what the backward keeps of one micro-batch (token_bytes):
                                              N = micro_batch_tokens (rows x padded width, the bound
                                              micro_batches keeps), L layers, hidden h, intermediate i, kv = key/
                                              value heads x head size, b the dtype's bytes (Llama-family, SDPA
                                              attention: within 0.1% of the saved tensors counted at 100M)
          + A * V * (2b + 8)                  the answers' logits (A <= N positions the loss reads, V the
                                              vocabulary): the head's output, its float32 copy and gradients
          + ((2k + 6) * 4 + 2b) * c           chunk buffers of k models' task vectors (surrogate.py), c = CPU_CHUNK
          [+ (k + 2) * b * c]                 x kernel threads on CPU, DEVICE_CHUNK on an accelerator (plus the
                                              inputs' and the gradient's chunks copied there)
          [+ N * (L * (8h + 2kv + 4i) + 3h) * b]  on CPU only: glibc keeps one micro-batch's freed activations
                                              beside the next one's (a GPU's caching allocator reuses them)
    host: k * n / 8 bytes for DELLA's bit-packed masks (n parameters); nothing for the other methods.

That is, at most model bytes + its largest tensor + N x (per-token activations) + small terms, with N chosen by
the plan (by default, default_micro_batch_tokens: activations of about half the model's bytes); the measured
figures, CPU allocators' slack included, are in bench/README.md (bench/refine_memory.py). The engine before this
one held the base and one sparsified task vector per model for every tensor in float32, (k + 1) x n x 4 bytes,
plus the autograd graph of the merge and the activations of every training example at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.merge.registry import names
from evomerge.refine.descent import backward, balanced, descend, gradients_for
from evomerge.refine.footprint import model_micro_batch_tokens
from evomerge.refine.losses import (
    KINDS,
    Item,
    Loss,
    MicroBatch,
    answer_loss,
    micro_batches,
    pad_token_id,
    training_items,
)

if TYPE_CHECKING:
    import torch

    from evomerge.candidate.space import SearchSpace
    from evomerge.merge.materialize import Materializer
    from evomerge.refine.differentiable import FrozenTensor
    from evomerge.scoring.scorer import Scorer

# methods whose merge is base + lambda * (sum of weighted, optionally sparsified, task vectors [/ normaliser])
REFINABLE = frozenset(names(refinable=True))
MOVED = ("weight", "lambda")  # the parameters the gradient moves; every other one stays at the starting point


def check_refinable(scorer: Scorer, method: str) -> None:
    """ConfigError unless refine can follow a gradient for `method` on these tasks."""
    if method not in REFINABLE:
        raise ConfigError(
            f"refine: method {method!r} has no weight gradient here; refine works with "
            f"{', '.join(sorted(REFINABLE))}; remove `refine` or change `method`"
        )
    bad = [f"{leaf} ({task.OUTPUT_TYPE})" for leaf, task in scorer.tasks.items() if task.OUTPUT_TYPE not in KINDS]
    if bad:
        raise ConfigError(
            f"refine: tasks {', '.join(bad)} have no answer to score by likelihood; "
            "refine needs loglikelihood, multiple_choice or generate_until tasks"
        )


@dataclass
class _Tensor:
    """One merged tensor at a start point: its surrogate, where it lives, and its values' affine map."""

    frozen: FrozenTensor
    target: torch.Tensor  # the resident model's tensor
    param: torch.nn.Parameter | None  # the parameter that holds it (None: a buffer, no gradient)
    value: torch.Tensor  # float64 [w_1 .. w_k, lambda] at the start point
    deriv: torch.Tensor  # float64 (k + 1) x slots: d value / d slot
    moves: bool  # some refined slot changes its values

    def weights(self, dx: torch.Tensor) -> list[float]:
        return (self.value + self.deriv @ dx).tolist()


@dataclass
class _Start:
    """Everything the steps from one start point need: the frozen tensors, the slots' start and bounds."""

    tensors: list[_Tensor]
    x0: torch.Tensor
    lo: torch.Tensor
    span: torch.Tensor


class Refiner:
    """The refinement over one worker's loaded inputs and resident model (see the module docstring).

    `loss`: a function of the logits on one micro-batch (objective.Loss), default the answers' likelihood;
    `micro_batch_tokens`: positions (rows x padded width) per forward/backward, which bounds the activations
    (the resource plan's, else `default_micro_batch_tokens`); `seed` and `dtype`: the search's, so the frozen
    masks are the ones its trials are merged with."""

    def __init__(
        self,
        materializer: Materializer,
        scorer: Scorer,
        space: SearchSpace,
        models: Sequence[Any],
        base: Any,
        method: str,
        examples: int | None = None,
        *,
        seed: int = 0,
        dtype: str | None = None,
        loss: Loss = answer_loss,
        micro_batch_tokens: int | None = None,
        balance: bool = True,
    ):
        from evomerge.merge.materialize import torch_dtype

        check_refinable(scorer, method)
        self.mat, self.scorer, self.space = materializer, scorer, space
        self.models, self.base, self.method = [str(m) for m in models], str(base), method
        self.seed, self.dtype, self.loss, self.balance = seed, torch_dtype(dtype), loss, balance
        self.micro_batch_tokens = micro_batch_tokens or model_micro_batch_tokens(materializer.model)
        self.slots = [s for s in space.slots(self.models) if s.param in MOVED]
        if not self.slots:
            raise ConfigError(f"refine: search space {space.spec.name!r} searches no weight or lambda to refine")
        lm = scorer.wrap(materializer.model, materializer.tokenizer)
        self.items: list[Item] = training_items(scorer, lm, examples)
        self._pad = pad_token_id(materializer.tokenizer)
        self._max_length = lm.max_length
        self._batches: dict[int, list[MicroBatch]] = {}
        self._deriv: dict[str, list[list[float]]] | None = None  # the affine map's derivative (_linear_map)

    def batches(self, tokens: int | None = None) -> list[MicroBatch]:
        """The training items in micro-batches of at most `tokens` positions (default `micro_batch_tokens`)."""
        tokens = tokens or self.micro_batch_tokens
        if tokens not in self._batches:
            self._batches[tokens] = micro_batches(self.items, self._pad, self._max_length, tokens)
        return self._batches[tokens]

    # -- the public steps ------------------------------------------------------------------------------------
    def write(self, point: dict[str, float]) -> None:
        """The surrogate's merged state at `point` into the resident model (tests compare it with the merge)."""
        start = self.prepare(point)
        self._write(start, start.x0, everything=True)

    def gradient(
        self, point: dict[str, float], micro_batch_tokens: int | None = None
    ) -> tuple[float, dict[str, float]]:
        """The loss at `point` and its gradient with respect to each refined slot (in the point's units)."""
        start = self.prepare(point)
        self._write(start, start.x0, everything=True)
        with self._grads(start):
            loss = backward(self.mat.model, self.loss, self.batches(micro_batch_tokens), grad=True)
            g = self._slot_grad(start, start.x0)
        return loss, {s.name: float(v) for s, v in zip(self.slots, g)}

    def run(
        self,
        point: dict[str, float],
        steps: int = 60,
        every: int = 10,
        lr: float = 0.05,
        log=None,
        micro_batch_tokens: int | None = None,
        progress=None,
    ) -> list[tuple[int, dict[str, float], float]]:
        """Adam on the refined slots (in units of each one's search range), from `point`; the point every
        `every` steps (and the last), with the surrogate loss there. The resident model is left holding the
        last surrogate state: the next merge overwrites every tensor."""
        start = self.prepare(point)
        batches = self.batches(micro_batch_tokens)
        lo, span = start.lo, start.span
        u = ((start.x0 - lo) / span).clone().requires_grad_(True)
        out: list[tuple[int, dict[str, float], float]] = []

        def at() -> torch.Tensor:
            return (lo + span * u).detach()

        def keep(step: int, loss: float) -> None:
            out.append((step, {s.name: float(v) for s, v in zip(self.slots, at())}, loss))
            if log:
                log(f"refine step {step}: surrogate loss {loss:.4f}")

        self._write(start, start.x0, everything=True)
        with self._grads(start):
            if self.balance:  # each task's loss scaled so that it moves the slots as much as the others

                def gradient_of(chosen: Sequence[MicroBatch]) -> torch.Tensor:
                    backward(self.mat.model, self.loss, chosen, True)
                    return span * self._slot_grad(start, start.x0)

                tokens = micro_batch_tokens or self.micro_batch_tokens
                batches = balanced(
                    self.items, lambda items: micro_batches(items, self._pad, self._max_length, tokens), gradient_of
                )
            descend(
                [u],
                (0.0, 1.0),
                steps=steps,
                every=every,
                lr=lr,
                loss_at=lambda grad: backward(self.mat.model, self.loss, batches, grad),
                gradient=lambda: [span * self._slot_grad(start, at())],
                write=lambda: self._write(start, at(), everything=False),
                keep=keep,
                progress=progress,
            )
        return [(step, {**point, **p}, loss) for step, p, loss in out]

    # -- one start point ---------------------------------------------------------------------------------------
    def prepare(self, point: dict[str, float]) -> _Start:
        """The surrogate at `point`: each merged tensor's frozen masks (built on the host, one tensor at a time),
        the affine map of its values, and the slots' bounds."""
        import torch

        from evomerge.merge.kernels.chunks import kernel_threads
        from evomerge.merge.methods import get_method
        from evomerge.refine.differentiable import freeze

        jobs, values, deriv = self._linear_map(point)
        method = get_method(self.method)
        keys = self._keys()
        params = {p.data_ptr(): p for p in self.mat.model.parameters()}
        read = self.mat.input_tensor  # as the merge reads it: a LoRA input's delta formed, vocabularies aligned
        f64 = torch.float64
        tensors = []
        with kernel_threads():
            for job in jobs:
                tp, base_key = job.params, job.base_model
                base = read(base_key, job.sources[job.inputs.index(base_key)])
                if not base.is_floating_point() or base.numel() == 0:
                    continue  # integer buffers: every merge copies them unchanged
                positions = [job.inputs.index(k) for k in keys]
                frozen = freeze(
                    job.name,
                    base,
                    [read(k, job.sources[i]) for k, i in zip(keys, positions)],
                    method,
                    [tp.per_input[k] for k in keys],
                    seed=self.seed,
                    positions=positions,
                    shared=tp.shared,
                    dtype=self.dtype,
                )
                target = self.mat.targets[job.name]
                d = torch.tensor(deriv[job.name], dtype=f64)
                value = torch.tensor(values[job.name], dtype=f64)
                tensors.append(_Tensor(frozen, target, params.get(target.data_ptr()), value, d, bool(d.any())))
        bounds = [self._bounds(s.param) for s in self.slots]
        return _Start(
            tensors,
            x0=torch.tensor([point[s.name] for s in self.slots], dtype=f64),
            lo=torch.tensor([low for low, _ in bounds], dtype=f64),
            span=torch.tensor([high - low for low, high in bounds], dtype=f64),
        )

    def _bounds(self, param: str) -> tuple[float, float]:
        """A searched parameter's (low, high) in the space (a refined slot is always searched: it has both)."""
        spec = self.space.spec.parameters[param]
        if spec.low is None or spec.high is None:
            raise ValueError(f"{param}: a fixed parameter has no range to refine in")
        return spec.low, spec.high

    def _keys(self) -> list[str]:
        from evomerge.merge.materialize import input_key as _key

        return [_key(m) for m in self.models]

    def _plan(self, point: dict[str, float]):
        """The point's recipe (exact values, the search's seed), planned over the resident model's layout."""
        from evomerge.merge.materialize import input_key as _key
        from evomerge.merge.plan import Plan

        recipe = self.space.to_recipe(point, self.models, self.base, self.method, self.seed, rounded=False)
        return Plan(recipe.map_models(_key), layout=self.mat.layout)

    def _linear_map(self, point: dict[str, float]):
        """The point's merge jobs, and per tensor the moved parameters' values at `point` ([w_1 .. w_k, lambda])
        and their derivative along each refined slot. The space maps a point to per-tensor values affinely
        (gradients interpolate, filters select), so the derivative is the same at every point: found once, by
        moving each slot in turn, and kept for the next start."""
        keys = self._keys()
        jobs = list(self._plan(point).jobs())

        def values(resolved) -> dict[str, list[float]]:
            out = {}
            for name, tp in resolved.items():
                w = [float(tp.per_input[k].get("weight", 1.0)) for k in keys]
                out[name] = w + [float(tp.shared.get("lambda", 1.0))]
            return out

        v0 = values({job.name: job.params for job in jobs})
        if self._deriv is None:
            deriv = {name: [[0.0] * len(self.slots) for _ in v] for name, v in v0.items()}
            for j, slot in enumerate(self.slots):
                low, high = self._bounds(slot.param)
                h = 1e-3 * (high - low)
                plan = self._plan({**point, slot.name: point[slot.name] + h})
                v1 = values({name: plan.resolve(name) for name in v0})
                for name in v0:
                    for i, (a, b) in enumerate(zip(v0[name], v1[name])):
                        if b != a:
                            deriv[name][i][j] = (b - a) / h
            self._deriv = deriv
        return jobs, v0, self._deriv

    # -- the step's parts --------------------------------------------------------------------------------------
    def _write(self, start: _Start, x: torch.Tensor, everything: bool) -> None:
        import torch

        from evomerge.merge.kernels.chunks import kernel_threads
        from evomerge.refine.differentiable import write_merged

        dx = x - start.x0
        with torch.no_grad(), kernel_threads():
            for t in start.tensors:
                if everything or t.moves:
                    w = t.weights(dx)
                    write_merged(t.frozen, w[:-1], w[-1], t.target)

    def _grads(self, start: _Start) -> AbstractContextManager[None]:
        """Gradients on for the parameters the slots move, off for the rest; back as they were after."""
        return gradients_for(self.mat.model, {t.param for t in start.tensors if t.moves and t.param is not None})

    def _slot_grad(self, start: _Start, x: torch.Tensor) -> torch.Tensor:
        """dL/d(slot) at x: per moving tensor, the inner products of its gradient with the task vectors,
        through the tensor's affine map."""
        import torch

        from evomerge.merge.kernels.chunks import kernel_threads
        from evomerge.refine.differentiable import merged_grads

        dx = x - start.x0
        g = torch.zeros(len(self.slots), dtype=torch.float64)
        with torch.no_grad(), kernel_threads():
            for t in start.tensors:
                if not t.moves or t.param is None or t.param.grad is None:
                    continue
                w = t.weights(dx)
                parts = merged_grads(t.frozen, w[:-1], w[-1], t.param.grad)
                g += t.deriv.T @ torch.tensor(parts, dtype=torch.float64)
        return g


__all__ = [
    "MOVED",
    "REFINABLE",
    "Item",
    "Refiner",
    "check_refinable",
    "training_items",
]
