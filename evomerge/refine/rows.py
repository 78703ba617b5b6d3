"""Per-row refinement: the gradient moves one coefficient per output row of every merged tensor and model (the
loop, refine/descent.py, is the per-tensor refinement's; the TIES sign election the kernels').

    refiner = RowRefiner(materializer, scorer, space, models, base, "task_arithmetic", loss="distill")
    path = refiner.run(point, steps=60, every=10, lr=0.05)     # [(step, point, loss, coefficients)]

The per-tensor refinement (refine/tensor.py) moves the recipe's own numbers: a weight per model, layer group and
tensor kind. Here the recipe's point stays where it is and each model's task vector is scaled row by row on top of
it (evomerge/merge/coefficients.py: an evomerge-only recipe, its multipliers in a safetensors file): for task
arithmetic, tensor by tensor,

    theta = base + sum_i c_i * m_i[:, None] * (model_i - base)      c_i = lambda * w_i at the point, m_i >= 0

with m_i one multiplier per output row (dimension 0: a weight matrix's output features, a norm's elements, an
embedding's tokens), 1 at the start unless the start carries coefficients of its own. For TIES the scaled task
vectors are pruned by magnitude, sign-elected and averaged as the method does, its masks recomputed at each step
without gradient (as the per-tensor refinement's sign election), so the surrogate is the real merge of the scaled
inputs up to magnitude ties; its gradient holds the masks. For task arithmetic the merge is linear in m,
so the gradient comes from one backward pass of the resident model: dL/dm_i[r] = c_i * <G[r], (model_i - base)[r]>
with G = dL/dtheta, its rows dotted with the task vector's rows read from the memory-mapped inputs, block by block.
No task vector is held whole; the extra memory is the parameters' gradient, one block per model, and the
multipliers (rows x models floats).

Thousands of coefficients where the recipe has tens: what the gradient pays for. A search scores each point of the
path as a trial (its coefficients in a file under the run directory), so the surrogate only proposes; the
overfitting guard then picks among the best on the validation splits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from evomerge.candidate.space import SearchSpace
    from evomerge.merge.materialize import Materializer
    from evomerge.refine.losses import Example, MicroBatch
    from evomerge.scoring.scorer import Scorer

ROW_METHODS = frozenset({"task_arithmetic", "ties"})  # a linear merge, and TIES (its masks recomputed each step)
LOSSES = ("likelihood", "distill")
BOUNDS = (0.0, 4.0)  # each multiplier's range (1: the recipe's own weight)
BLOCK = 1 << 16  # elements per block of the row dot products and writes


def check_rows(method: str) -> None:
    if method not in ROW_METHODS:
        raise ConfigError(
            f"refine.arms rows and distill: method {method!r} has no per-row surrogate; per-row coefficients work with "
            f"{', '.join(sorted(ROW_METHODS))}: use refine.arms: [tensor] or change `method`"
        )


@dataclass
class _Row:
    """One merged tensor: its inputs (memory-mapped), each model's c_i at the point, the resident parameter."""

    name: str
    base: torch.Tensor
    models: list[torch.Tensor]  # in the recipe's `models:` order
    coef: list[float]  # lambda * w_i
    target: torch.Tensor
    param: Any
    densities: list[float] | None = None  # TIES: each model's density (None: task arithmetic)
    weights: list[float] | None = None  # TIES: w_i (coef / lambda)
    lam: float = 1.0
    normalize: bool = False

    @property
    def rows(self) -> int:
        return self.base.shape[0] if self.base.dim() else 1


def _ties(r: _Row, m: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TIES over the row-scaled task vectors u_i = m_i * tau_i, one tensor: (theta as rows x columns, and per
    model d theta / d m_i per element with the masks held: lambda * w_i * c_i * tau_i / D). The masks are
    recomputed at these multipliers (magnitude top-density of u_i, the elected sign of sum_i w_i s_i, the
    agreeing models' weights as divisor), so the surrogate is the merge of the scaled inputs up to ties."""
    import torch

    from evomerge.merge.kernels.gta import agreement, elected_sign

    if r.densities is None or r.weights is None:
        raise ValueError(f"{r.name}: not a TIES tensor (no densities)")
    weights = r.weights
    b = r.base.reshape(r.rows, -1).float()
    taus = [x.reshape(r.rows, -1).float() - b for x in r.models]
    kept = []
    for tau, mult, density in zip(taus, m, r.densities):
        u = tau * mult.unsqueeze(1)
        n = u.numel()
        k = int(density * n)
        if k >= n:
            kept.append(u)
            continue
        if k <= 0:
            kept.append(torch.zeros_like(u))
            continue
        threshold = u.abs().flatten().kthvalue(n - k + 1).values
        kept.append(torch.where(u.abs() >= threshold, u, torch.zeros_like(u)))
    elected = elected_sign(_added(w * s for w, s in zip(weights, kept)))
    agree = [agreement(s, elected, negate=w < 0) for w, s in zip(weights, kept)]
    div = _added(w * c for w, c in zip(weights, agree)) if r.normalize else torch.ones_like(b)
    div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
    mixed = _added(w * c * s for w, c, s in zip(weights, agree, kept)) / div
    factors = [r.lam * w * c * (s != 0).float() * tau / div for w, c, s, tau in zip(weights, agree, kept, taus)]
    return b + r.lam * mixed, factors


def _added(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """terms[0] + terms[1] + ... in that order (the sum of one tensor per model)."""
    it = iter(terms)
    total = next(it)
    for term in it:
        total = total + term
    return total


class RowRefiner:
    """Per-row coefficients over one worker's loaded inputs and resident model (see the module docstring).

    `loss`: "likelihood" (the search tasks' reference answers) or "distill" (refine/distill.py: each task's best
    source, on its own greedy answers; prompts only); `examples`: as the per-tensor refinement's."""

    def __init__(
        self,
        materializer: Materializer,
        scorer: Scorer,
        space: SearchSpace,
        models: Sequence[Any],
        base: Any,
        method: str,
        *,
        loss: str = "likelihood",
        examples: int | None = None,
        seed: int = 0,
        top_k: int = 16,
        micro_batch_tokens: int | None = None,
        balance: bool = True,
    ):
        from evomerge.refine.footprint import model_micro_batch_tokens
        from evomerge.refine.losses import answer_loss, micro_batches, pad_token_id, training_items

        check_rows(method)
        if loss not in LOSSES:
            raise ConfigError(f"refine.arms: loss {loss!r} is not one of {', '.join(LOSSES)}")
        self.mat, self.scorer, self.space = materializer, scorer, space
        self.models, self.base, self.method, self.seed = [str(m) for m in models], str(base), method, seed
        tok = materializer.tokenizer
        lm = scorer.wrap(materializer.model, tok)
        items: Sequence[Example]
        if loss == "distill":
            from evomerge.refine.distill import distill_items, distill_loss, owners, source_scores

            inputs = [self.base, *self.models]  # the base first: it owns a task no fine-tune improves
            self.owner_of = owners(source_scores(materializer, scorer, inputs))
            items = distill_items(materializer, scorer, self.owner_of, inputs, top_k=top_k, examples=examples)
            self.loss = distill_loss
        else:
            items, self.loss = training_items(scorer, lm, examples), answer_loss
        self.items, self.balance = items, balance
        pad = pad_token_id(tok)
        tokens = micro_batch_tokens or model_micro_batch_tokens(materializer.model)
        self._batch = lambda chosen: micro_batches(chosen, pad, lm.max_length, tokens)  # the per-tensor bound
        self.batches = self._batch(items)

    # -- the merge at a point ----------------------------------------------------------------------------
    def _rows(self, point: dict[str, float]) -> list[_Row]:
        from evomerge.merge.materialize import input_key
        from evomerge.merge.plan import Plan

        recipe = self.space.to_recipe(point, self.models, self.base, self.method, self.seed, rounded=True)
        recipe = recipe.map_models(input_key)
        keys = [e.model for e in recipe.models]
        ckpts = {c.path.resolve().as_posix(): c for c in self.mat.checkpoints}
        params = {p.data_ptr(): p for p in self.mat.model.parameters()}
        out = []
        for job in Plan(recipe, layout=self.mat.layout).jobs():
            src = dict(zip(job.inputs, job.sources))
            if job.base_model is None:
                raise ValueError(f"{job.name}: {self.method} merges onto a base model, and this job has none")
            base = ckpts[job.base_model].get(src[job.base_model])
            if not base.is_floating_point() or base.numel() == 0:
                continue
            lam = float(job.params.shared.get("lambda", 1.0))
            coef = [lam * float(job.params.per_input[k].get("weight", 1.0)) for k in keys]
            target = self.mat.targets[job.name]
            models = [ckpts[k].get(src[k]) for k in keys]
            row = _Row(job.name, base, models, coef, target, params.get(target.data_ptr()))
            if self.method == "ties":
                row.densities = [float(job.params.per_input[k].get("density", 1.0)) for k in keys]
                row.weights = [float(job.params.per_input[k].get("weight", 1.0)) for k in keys]
                row.lam, row.normalize = lam, bool(job.params.shared.get("normalize", False))
            out.append(row)
        return out

    def write(self, point: dict[str, float], coefficients: dict[str, torch.Tensor] | None = None) -> None:
        """The merge at `point` with these coefficients (file keys; absent: 1) into the resident model."""
        rows = self._rows(point)
        self._write(rows, self._start(rows, coefficients))

    def _start(self, rows: list[_Row], coefficients: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        import torch

        from evomerge.merge.coefficients import key

        m = {}
        for r in rows:
            for i in range(len(self.models)):
                given = (coefficients or {}).get(key(i, r.name))
                m[key(i, r.name)] = given.float().clone() if given is not None else torch.ones(r.rows)
        return m

    def _write(self, rows: list[_Row], m: dict[str, torch.Tensor]) -> None:
        import torch

        from evomerge.merge.coefficients import key

        with torch.no_grad():
            for r in rows:
                if r.densities is not None:
                    theta, _ = _ties(r, [m[key(i, r.name)] for i in range(len(r.models))])
                    r.target.copy_(theta.view_as(r.target).to(device=r.target.device, dtype=r.target.dtype))
                    continue
                flat_out = r.target.view(r.rows, -1)
                base = r.base.reshape(r.rows, -1)
                step = max(1, BLOCK // max(base.shape[1], 1))
                for lo in range(0, r.rows, step):
                    b = base[lo : lo + step].float()
                    theta = b.clone()
                    for i, (x, c) in enumerate(zip(r.models, r.coef)):
                        mult = m[key(i, r.name)][lo : lo + step].unsqueeze(1) * c
                        theta.add_((x.reshape(r.rows, -1)[lo : lo + step].float() - b) * mult)
                    flat_out[lo : lo + step].copy_(theta.to(device=flat_out.device, dtype=flat_out.dtype))

    def _grads(self, rows: list[_Row], m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dL/dm_i per row from the parameters' gradients: c_i * <G[r], tau_i[r]>, block by block."""
        import torch

        from evomerge.merge.coefficients import key

        out = {}
        with torch.no_grad():
            for r in rows:
                grad = r.param.grad if r.param is not None else None
                for i in range(len(r.models)):
                    out[key(i, r.name)] = torch.zeros(r.rows, dtype=torch.float32)
                if grad is None:
                    continue
                if r.densities is not None:
                    _, factors = _ties(r, [m[key(i, r.name)] for i in range(len(r.models))])
                    g = grad.reshape(r.rows, -1).float().cpu()
                    for i, f in enumerate(factors):
                        out[key(i, r.name)] = (g * f).sum(1)
                    continue
                g_all = grad.reshape(r.rows, -1)
                base = r.base.reshape(r.rows, -1)
                step = max(1, BLOCK // max(base.shape[1], 1))
                for lo in range(0, r.rows, step):
                    g = g_all[lo : lo + step].float().cpu()
                    b = base[lo : lo + step].float()
                    for i, (x, c) in enumerate(zip(r.models, r.coef)):
                        tau = x.reshape(r.rows, -1)[lo : lo + step].float() - b
                        out[key(i, r.name)][lo : lo + step] = c * (g * tau).sum(1)
        return out

    def run(
        self,
        point: dict[str, float],
        steps: int = 60,
        every: int = 10,
        lr: float = 0.05,
        coefficients: dict[str, torch.Tensor] | None = None,
        log: Callable[[str], None] | None = None,
        progress: Callable[[int, float, bool], None] | None = None,
    ) -> list[tuple[int, dict[str, float], float, dict[str, torch.Tensor]]]:
        """Adam on the multipliers from `point` (and `coefficients`, else 1), each kept in BOUNDS; every `every`
        steps (and the last) the point, the loss there and a copy of the multipliers."""
        from evomerge.refine.descent import backward, balanced, descend, gradients_for

        rows = self._rows(point)
        m = self._start(rows, coefficients)
        names = list(m)
        out = []

        def keep(step: int, loss: float) -> None:
            out.append((step, dict(point), loss, {n: m[n].detach().clone() for n in names}))
            if log:
                log(f"row refinement step {step}: loss {loss:.4f}")

        def gradient() -> list[torch.Tensor]:
            grads = self._grads(rows, m)
            return [grads[n] for n in names]

        def gradient_of(batches: Sequence[MicroBatch]) -> torch.Tensor:
            import torch

            backward(model, self.loss, batches, True)
            return torch.cat(gradient())

        model = self.mat.model
        self._write(rows, m)
        with gradients_for(model, {r.param for r in rows if r.param is not None}):
            batches = balanced(self.items, self._batch, gradient_of) if self.balance else self.batches
            descend(
                [m[n].requires_grad_(False) for n in names],
                BOUNDS,
                steps=steps,
                every=every,
                lr=lr,
                loss_at=lambda grad: backward(model, self.loss, batches, grad),
                gradient=gradient,
                write=lambda: self._write(rows, m),
                keep=keep,
                progress=progress,
            )
        return out


SAMPLED_ROW_LR = 0.2  # refine.row_lr auto: the fraction of refine.lr a per-row round on a capped sample steps by


def row_step(lr: float, row_lr: float | None, sampled: bool) -> float:
    """The per-row coefficients' Adam step: `row_lr` where the config sets it, else `lr`, scaled by SAMPLED_ROW_LR
    where the round trains on a sample smaller than the search subsets. Measured on the real member (8 examples a
    task, hundreds of thousands of coefficients): at lr 0.05 the search objective peaks by step 10, the code task
    already lost there; at 0.01 code and stutter hold while parity climbs to step 20."""
    if row_lr is not None:
        return row_lr
    return lr * SAMPLED_ROW_LR if sampled else lr


def save_coefficients(run_dir: Path | str, coefficients: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write a path point's multipliers to the run directory's coefficient folder; {file, sha256} for its trial."""
    import hashlib

    from safetensors.torch import save

    from evomerge.config.rundir import RunDir
    from evomerge.io.atomic import write_file_atomic

    data = save({k: v.detach().to("cpu").float().contiguous() for k, v in sorted(coefficients.items())})
    digest = hashlib.sha256(data).hexdigest()
    path = RunDir.at(run_dir).coefficient_file(digest).resolve()
    if not path.is_file():
        write_file_atomic(path, data)
    return {"file": str(path), "sha256": digest}


def load_coefficients(ref: dict[str, str] | None) -> dict[str, torch.Tensor] | None:
    """A trial's multipliers ({file key: tensor}), checked against its hash; None for a trial without them."""
    from evomerge.merge.coefficients import RowCoefficients, key

    if ref is None:
        return None
    loaded = RowCoefficients.load(ref["file"], ref["sha256"], source="trial")
    return {key(i, name): value for (i, name), value in loaded.values.items()}


def with_coefficients(recipe, ref: dict[str, str] | None):
    """The trial's recipe, naming its coefficient file (an evomerge-only recipe) when it has one."""
    from evomerge.merge.recipe import CoefficientFile

    if ref is None:
        return recipe
    return recipe.with_provenance(coefficients=CoefficientFile(**ref))


__all__ = [
    "BOUNDS",
    "SAMPLED_ROW_LR",
    "LOSSES",
    "ROW_METHODS",
    "RowRefiner",
    "check_rows",
    "load_coefficients",
    "row_step",
    "save_coefficients",
    "with_coefficients",
]
