"""The refinement engine evomerge had before issue 19, kept as a reference for tests and bench/refine_memory.py.

    ref = AutogradRefiner(materializer, scorer, space, models, base, method)   # Refiner's arguments
    loss, grad = ref.gradient(point)       # autograd through the merge formula, every example in one batch
    path = ref.run(point, steps=6, every=2)

It holds the base and every sparsified task vector of every tensor on the device in float32, builds the merged
state under autograd with torch.func.functional_call and runs one forward over all training examples at once:
the memory the new engine (evomerge/refine/tensor.py) avoids. Its masks come from evomerge-1's `merge_gta`
(one input of weight 1 over a zero base gives that input's pruned task vector), independently of
evomerge/refine/differentiable.py, so the two engines differ only in how they differentiate.
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.kernels.gta import merge_gta
from evomerge.merge.methods import get_method
from evomerge.refine.tensor import Refiner


class _Batch:
    """Every continuation of every item, right-padded into one batch (the old engine's single batch)."""

    def __init__(self, items, pad: int, max_length: int):
        rows, targets = [], []
        for item in items:
            for cont in item.continuations:
                seq = (item.context + cont)[-(max_length + 1) :]
                rows.append(seq[:-1])
                targets.append([-100] * (len(seq) - 1 - len(cont)) + cont)
        width = max(map(len, rows))
        self.ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        self.mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        self.target = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        self.items = list(items)


def _loglik(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = target != -100
    tok = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def item_loss(batch: _Batch, loglik: torch.Tensor) -> torch.Tensor:
    total = loglik.new_zeros(())
    k = 0
    for item in batch.items:
        n = len(item.continuations)
        ll = loglik[k : k + n]
        k += n
        total = total + item.weight * (-(ll[item.gold]) if n == 1 else -(torch.log_softmax(ll, 0)[item.gold]))
    return total / sum(item.weight for item in batch.items)


class AutogradRefiner(Refiner):
    """Refiner's interface, the old engine's differentiation (see the module docstring)."""

    def _context(self, point: dict[str, float]) -> dict[str, Any]:
        jobs, v0, deriv = self._linear_map(point)
        device = next(self.mat.model.parameters()).device
        spec = self.space.spec.parameters
        f64 = torch.float64
        return {
            "device": device,
            "lo": torch.tensor([spec[s.param].low for s in self.slots], dtype=f64),
            "span": torch.tensor([spec[s.param].high - spec[s.param].low for s in self.slots], dtype=f64),
            "x0": torch.tensor([point[s.name] for s in self.slots], dtype=f64),
            "frozen": {job.name: self._frozen(job, device) for job in jobs},
            "coef": {job.name: (torch.tensor(v0[job.name], dtype=f64), torch.tensor(deriv[job.name], dtype=f64))
                     for job in jobs},
        }  # fmt: skip

    def _frozen(self, job, device) -> dict[str, Any]:
        """Base and the sparsified task vectors at the start densities, whole, on the device."""
        ckpts = {c.path.resolve().as_posix(): c for c in self.mat.checkpoints}
        method = get_method(self.method)
        tp = job.params
        base = ckpts[job.base_model].get(job.name)
        if not base.is_floating_point() or base.numel() == 0:
            return {"fixed": base.to(device)}
        deltas = []
        for key in self._keys():
            delta = ckpts[key].get(job.name) - base
            own = tp.per_input[key]
            bound = {
                "rescale": bool(tp.shared.get("rescale")),
                "normalize": False,
                "lambda": 1.0,
                "weight": {key: 1.0},
                "density": {key: own.get("density", 1.0)},
                **{p: {key: own[p]} for p in ("gamma", "epsilon") if p in own},
            }
            position = job.inputs.index(key)
            deltas.append(
                merge_gta(
                    method, torch.zeros_like(delta), [(key, position, delta)], bound, seed=self.seed, name=job.name
                )
            )
        return {
            "base": base.float().to(device),
            "deltas": torch.stack(deltas).float().to(device),
            "consensus": method.consensus_method is not None,
            "normalize": bool(tp.shared.get("normalize", False)),
        }

    def _state(self, ctx: dict[str, Any], x: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(self.mat.model.named_parameters())
        state = {}
        for n, entry in ctx["frozen"].items():
            value, d = ctx["coef"][n]
            weights = (value + d @ (x - ctx["x0"])).float().to(ctx["device"])
            t = _merge(entry, weights)
            state[n] = t.to(params[n].dtype) if n in params else t
        return state

    def _loss(self, ctx, x) -> torch.Tensor:
        from torch.func import functional_call

        model = self.mat.model
        for p in model.parameters():
            p.requires_grad_(False)
        pad = self._pad
        batch = _Batch(self.items, pad, self._max_length)
        device = ctx["device"]
        ids, mask, target = batch.ids.to(device), batch.mask.to(device), batch.target.to(device)
        full = {**dict(model.named_parameters()), **dict(model.named_buffers()), **self._state(ctx, x)}
        logits = functional_call(model, full, (ids,), {"attention_mask": mask}).logits
        return item_loss(batch, _loglik(logits, target))

    def gradient(
        self, point: dict[str, float], micro_batch_tokens: int | None = None
    ) -> tuple[float, dict[str, float]]:
        ctx = self._context(point)
        x = ctx["x0"].clone().requires_grad_(True)
        loss = self._loss(ctx, x)
        loss.backward()
        return loss.item(), {s.name: float(v) for s, v in zip(self.slots, x.grad)}

    def run(self, point, steps=60, every=10, lr=0.05, log=None, micro_batch_tokens=None):
        ctx = self._context(point)
        lo, span = ctx["lo"], ctx["span"]
        u = ((ctx["x0"] - lo) / span).clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        out = []
        for step in range(steps + 1):
            x = lo + span * u
            loss = self._loss(ctx, x)
            if step % every == 0 or step == steps:
                out.append((step, {s.name: float(v) for s, v in zip(self.slots, x.detach())}, loss.item()))
                if log:
                    log(f"refine step {step}: surrogate loss {loss.item():.4f}")
            if step == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                u.clamp_(0.0, 1.0)
        return [(step, {**point, **p}, loss) for step, p, loss in out]


def _merge(entry: dict[str, Any], w: torch.Tensor) -> torch.Tensor:
    """One tensor of the surrogate under autograd: `w` holds each model's weight, then lambda."""
    if "fixed" in entry:
        return entry["fixed"]
    weights, lam = w[:-1], w[-1]
    deltas = entry["deltas"]
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    weighted = deltas * weights.view(shape)
    if entry["consensus"]:
        with torch.no_grad():
            elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            mask = (deltas.sign() == elected).to(deltas.dtype)
        mixed = (weighted * mask).sum(0)
        divisor = (weights.view(shape) * mask).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(0)
        total = weights.sum()
        divisor = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    if entry["normalize"]:
        mixed = mixed / divisor
    return entry["base"] + lam * mixed
