"""Gradient refinement of a recipe's weights (AdaMerging-style, supervised on the search subsets).

    refiner = Refiner(materializer, scorer, space, models, method)
    path = refiner.run(point, steps=60, every=10)      # [(step, point, loss)], points in the space's coordinates

A sampler treats a candidate as a black box: one score per merge. But for the task-arithmetic family the merged
weights are a smooth function of the per-group `weight` and `lambda` values, and for loglikelihood and
multiple-choice tasks (and the reference answers of generation tasks) the answer's log-likelihood is a smooth
function of the weights, so its gradient with respect to every searched weight comes from one backward pass.
`Refiner` follows that gradient (Adam, each value kept inside its search bounds) from a point of the search space
and returns the points it passes; the search then merges and scores each of them exactly like any trial, so the
surrogate below only proposes, it never decides.

The surrogate is the method's formula with everything but the weights frozen at the starting point: task
vectors sparsified once at the starting densities (TIES-style magnitude pruning; DARE/DELLA masks drawn once), the
sign-consensus mask recomputed each step without gradient, normalisation and lambda as the recipe resolves them.
Densities, `t` and other parameters are not moved. Methods outside the family (slerp, nuslerp, model_stock,
passthrough) and tasks whose answers cannot be scored by likelihood are refused with a ConfigError naming them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.merge.registry import names

if TYPE_CHECKING:
    import torch

# methods whose merge is base + lambda * (sum of weighted, optionally sparsified, task vectors [/ normaliser])
REFINABLE = frozenset(names(refinable=True))
MOVED = ("weight", "lambda")  # the parameters the gradient moves; every other one stays at the starting point


@dataclass
class Item:
    """One scored example: token ids of its context and of each candidate continuation, and the right one."""

    task: str
    weight: float  # the task's share of the objective divided by its example count
    context: list[int]
    continuations: list[list[int]]
    gold: int  # index into continuations (0 for a single reference answer)


def check_refinable(scorer, method: str) -> None:
    """ConfigError unless refine can follow a gradient for `method` on these tasks."""
    if method not in REFINABLE:
        raise ConfigError(
            f"refine: method {method!r} has no weight gradient here; refine works with "
            f"{', '.join(sorted(REFINABLE))}; remove `refine` or change `method`"
        )
    bad = [
        f"{leaf} ({task.OUTPUT_TYPE})"
        for leaf, task in scorer.tasks.items()
        if task.OUTPUT_TYPE not in ("loglikelihood", "multiple_choice", "generate_until")
    ]
    if bad:
        raise ConfigError(
            f"refine: tasks {', '.join(bad)} have no answer to score by likelihood; "
            "refine needs loglikelihood, multiple_choice or generate_until tasks"
        )


def training_items(scorer, lm, examples: int | None = None) -> list[Item]:
    """The search tasks' examples as token ids, built with lm-eval's own requests and HFLM's tokenisation: each
    task's search subset, or with `examples`, up to that many of the task's examples (its whole search split, in a
    seeded order), so the gradient sees more than the sampler scores."""
    items: list[Item] = []
    unsupported = []
    for spec in scorer.specs:
        leaves = scorer.members[spec.name]
        for leaf in leaves:
            task = scorer.tasks[leaf]
            kind = task.OUTPUT_TYPE
            if kind not in ("loglikelihood", "multiple_choice", "generate_until"):
                unsupported.append(f"{leaf} ({kind})")
                continue
            if examples is None:
                chosen = set(scorer.indices(leaf))
            else:
                order = list(range(len(task.eval_docs)))
                random.Random(f"{scorer.seed}:{leaf}:refine").shuffle(order)
                chosen = set(order[:examples])
            docs = [doc for i, doc in enumerate(task.eval_docs) if i in chosen]
            share = spec.weight / len(leaves) / max(len(docs), 1)
            for doc in docs:
                items.append(_item(task, doc, kind, leaf, share, lm))
    if unsupported:
        raise ConfigError(
            f"refine: tasks {', '.join(unsupported)} have no answer to score by likelihood; "
            "refine needs loglikelihood, multiple_choice or generate_until tasks"
        )
    return items


def _item(task, doc, kind: str, leaf: str, share: float, lm) -> Item:
    ctx = task.fewshot_context(doc, num_fewshot=task.get_config("num_fewshot") or 0)
    if isinstance(ctx, list):  # lm-eval's multiple-input form: several contexts, one continuation
        raise ConfigError(f"refine: task {leaf} has several contexts per example; refine cannot score it")
    delim = task.get_config("target_delimiter") or ""
    if kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_target(doc)
        gold = choices.index(gold) if isinstance(gold, str) else int(gold[0] if isinstance(gold, list) else gold)
        conts = [f"{delim}{c}" for c in choices]
    else:
        target = task.doc_to_target(doc)
        target = target[0] if isinstance(target, list) else target
        conts, gold = [f"{delim}{target}"], 0
    encoded = [lm._encode_pair(ctx, c) for c in conts]
    context = encoded[0][0]
    return Item(leaf, share, context, [c for _, c in encoded], gold)


class _Batch:
    """Every continuation of every item, right-padded into one batch (they are short)."""

    def __init__(self, items: Sequence[Item], pad: int, max_length: int):
        import torch

        rows, targets = [], []
        for item in items:
            for cont in item.continuations:
                seq = (item.context + cont)[-(max_length + 1) :]
                rows.append(seq[:-1])
                # position p predicts token p+1 of (context + continuation): the continuation's tokens are the targets
                targets.append([-100] * (len(seq) - 1 - len(cont)) + cont)
        width = max(map(len, rows))
        self.ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        self.mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        self.target = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        self.items = list(items)


def _loglik(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities per row."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = target != -100
    tok = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def item_loss(batch: _Batch, loglik: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each item's loss: the gold continuation's NLL (one answer), or cross-entropy over choices."""
    import torch

    total = loglik.new_zeros(())
    k = 0
    for item in batch.items:
        n = len(item.continuations)
        ll = loglik[k : k + n]
        k += n
        total = total + item.weight * (-(ll[item.gold]) if n == 1 else -(torch.log_softmax(ll, 0)[item.gold]))
    return total / sum(item.weight for item in batch.items)


class Refiner:
    """The differentiable surrogate of one space's recipes over loaded inputs (see the module docstring)."""

    def __init__(
        self, materializer, scorer, space, models: Sequence[Any], base: Any, method: str, examples: int | None = None
    ):
        check_refinable(scorer, method)
        self.mat, self.scorer, self.space = materializer, scorer, space
        self.models, self.base, self.method = [str(m) for m in models], str(base), method
        self.slots = [s for s in space.slots(self.models) if s.param in MOVED]
        if not self.slots:
            raise ConfigError(f"refine: search space {space.spec.name!r} searches no weight or lambda to refine")
        lm = scorer.wrap(materializer.model, materializer.tokenizer)
        self.items = training_items(scorer, lm, examples)
        tok = materializer.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.batch = _Batch(self.items, pad, lm.max_length)

    # -- the surrogate ---------------------------------------------------------------------------------
    def _resolved(self, point: dict[str, float]) -> dict[str, Any]:
        """{tensor: TensorParams} of the point's recipe."""
        from evomerge.merge.materialize import _key
        from evomerge.merge.plan import Plan

        recipe = self.space.to_recipe(point, self.models, self.base, self.method, 0, rounded=False)
        models = [entry.model_copy(update={"model": _key(entry.model)}) for entry in recipe.models]
        recipe = recipe.model_copy(update={"models": models, "base_model": _key(recipe.base_model)})
        plan = Plan(recipe, num_layers=self.space.num_layers)
        return {name: plan.resolve(name) for name in self._names()}

    def _names(self) -> list[str]:
        return self.mat.checkpoints[-1].tensor_names()

    def _linear_map(self, point: dict[str, float]):
        """Per tensor: the moved parameters' values at `point` and their derivative along each refined slot
        (the space maps a point to per-tensor values affinely: gradients interpolate, filters select)."""
        from evomerge.merge.materialize import _key

        keys = [_key(m) for m in self.models]
        at = self._resolved(point)

        def values(resolved) -> dict[str, list[float]]:
            out = {}
            for name, tp in resolved.items():
                w = [float(tp.per_input[k].get("weight", 1.0)) for k in keys]
                lam = float(tp.shared.get("lambda", 1.0))
                out[name] = w + [lam]
            return out

        v0 = values(at)
        deriv = {name: [[0.0] * len(self.slots) for _ in v] for name, v in v0.items()}
        for j, slot in enumerate(self.slots):
            h = 1e-3 * (self.space.spec.parameters[slot.param].high - self.space.spec.parameters[slot.param].low)
            moved = dict(point)
            moved[slot.name] = point[slot.name] + h
            v1 = values(self._resolved(moved))
            for name in v0:
                for i, (a, b) in enumerate(zip(v0[name], v1[name])):
                    if b != a:
                        deriv[name][i][j] = (b - a) / h
        return at, v0, deriv

    def _prepare(self, point: dict[str, float]) -> dict[str, Any]:
        """Everything a surrogate state at a point near `point` needs: frozen tensors, the affine map, bounds."""
        import torch

        from evomerge.merge.materialize import _key

        at, v0, deriv = self._linear_map(point)
        names = self._names()
        keys = [_key(m) for m in self.models]
        ckpts = {c.path.resolve().as_posix(): c for c in self.mat.checkpoints}
        device = next(self.mat.model.parameters()).device
        spec = self.space.spec.parameters
        f64 = torch.float64
        return {
            "names": names,
            "device": device,
            "lo": torch.tensor([spec[s.param].low for s in self.slots], dtype=f64),
            "span": torch.tensor([spec[s.param].high - spec[s.param].low for s in self.slots], dtype=f64),
            "x0": torch.tensor([point[s.name] for s in self.slots], dtype=f64),
            "frozen": self._frozen(at, names, keys, ckpts, ckpts[_key(self.base)], device),
            "coef": {n: (torch.tensor(v0[n], dtype=f64), torch.tensor(deriv[n], dtype=f64)) for n in names},
        }

    def _state(self, ctx: dict[str, Any], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The surrogate's merged tensors at slot values `x` (differentiable in `x`)."""
        params = dict(self.mat.model.named_parameters())
        state = {}
        for n in ctx["names"]:
            value, d = ctx["coef"][n]
            weights = (value + d @ (x - ctx["x0"])).float().to(ctx["device"])
            t = self._merge(ctx["frozen"][n], weights)
            state[n] = t.to(params[n].dtype) if n in params else t
        return state

    def surrogate(self, point: dict[str, float]) -> dict[str, torch.Tensor]:
        """The surrogate's merged tensors at `point` itself (tests compare them with the real merge)."""
        import torch

        ctx = self._prepare(point)
        with torch.no_grad():
            return self._state(ctx, ctx["x0"])

    def run(
        self, point: dict[str, float], steps: int = 60, every: int = 10, lr: float = 0.05, log=None
    ) -> list[tuple[int, dict[str, float], float]]:
        """Adam on the refined slots (in units of each one's search range), from `point`; the point every
        `every` steps (and the last), with the surrogate loss there."""
        import torch
        from torch.func import functional_call

        ctx = self._prepare(point)
        model = self.mat.model
        device = ctx["device"]
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        lo, span = ctx["lo"], ctx["span"]
        u = ((ctx["x0"] - lo) / span).clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        out: list[tuple[int, dict[str, float], float]] = []
        for p in model.parameters():
            p.requires_grad_(False)
        b = self.batch
        ids, mask, target = b.ids.to(device), b.mask.to(device), b.target.to(device)
        for step in range(steps + 1):
            x = lo + span * u
            state = self._state(ctx, x)
            logits = functional_call(model, {**params, **buffers, **state}, (ids,), {"attention_mask": mask}).logits
            loss = item_loss(b, _loglik(logits, target))
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
        # the resident model's weights are unchanged (functional_call): the next apply() overwrites them anyway
        return [(step, {**point, **p}, loss) for step, p, loss in out]

    def _frozen(self, at, names, keys, ckpts, base_ck, device) -> dict[str, dict[str, Any]]:
        """Per tensor: base, the (sparsified) task vectors at the starting densities, and the shared flags."""
        import torch

        from evomerge.merge.materialize import tensor_seed
        from evomerge.merge.methods import get_method

        method = get_method(self.method)
        sparsification = getattr(method, "sparsification_method", None)
        consensus = getattr(method, "consensus_method", None)
        out = {}
        for n in names:
            tp = at[n]
            base = base_ck.get(n).float()
            if not base.is_floating_point() or base.numel() == 0:
                continue
            entry: dict[str, Any] = {"base": base.to(device)}
            deltas = []
            for k in keys:
                delta = ckpts[k].get(n).float() - base
                if sparsification:
                    from mergekit.sparsify import RescaleNorm, sparsify

                    extra = {p: tp.per_input[k][p] for p in ("gamma", "epsilon") if p in tp.per_input[k]}
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(tensor_seed(0, f"{n}:{k}"))
                        delta = sparsify(
                            delta,
                            density=float(tp.per_input[k].get("density", 1.0)),
                            method=sparsification,
                            rescale_norm=RescaleNorm.l1 if tp.shared.get("rescale") else None,
                            **extra,
                        )
                deltas.append(delta)
            entry["deltas"] = torch.stack(deltas).to(device)
            entry["consensus"] = consensus is not None
            entry["normalize"] = bool(tp.shared.get("normalize", False))
            out[n] = entry
        for n in names:
            if n not in out:
                out[n] = {"fixed": base_ck.get(n).to(device)}
        return out

    @staticmethod
    def _merge(entry: dict[str, Any], w: torch.Tensor) -> torch.Tensor:
        """One tensor of the surrogate: `w` holds each model's weight, then lambda."""
        import torch

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


__all__ = ["MOVED", "REFINABLE", "Item", "Refiner", "check_refinable", "item_loss", "training_items"]
