"""One TIES sign election (merge/kernels/gta.py `elected_sign`, `agreement`): the kernels, the per-tensor
refinement's differentiable merge (refine/differentiable.py) and the per-row refinement (refine/rows.py) elect the same
sign and merge to the same tensor, on small tensors with ties at zero and mixed signs."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.kernels.gta import agreement, elected_sign, merge_gta
from evomerge.merge.methods import get_method

# a row whose deltas cancel exactly (sum 0: + is elected), zero deltas (never agreeing), mixed signs
BASE = torch.tensor([[0.0, 1.0, -1.0, 2.0], [0.5, 0.0, 0.0, -0.5], [1.0, 1.0, 1.0, 1.0]])
DELTAS = (
    torch.tensor([[1.0, -1.0, 0.0, 2.0], [0.0, 0.0, 3.0, -1.0], [-2.0, 1.0, 0.0, 0.5]]),
    torch.tensor([[-1.0, 1.0, 0.0, -3.0], [0.0, 2.0, -3.0, 1.0], [2.0, -1.0, 0.0, -0.5]]),
)


def test_the_election_counts_a_zero_sum_as_plus_and_a_zero_delta_as_dissent():
    total = torch.tensor([0.0, -0.0, 1.5, -2.0])
    assert elected_sign(total).tolist() == [1.0, 1.0, 1.0, -1.0]
    delta = torch.tensor([0.0, -1.0, 2.0, 3.0])
    assert agreement(delta, elected_sign(total)).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert agreement(delta, elected_sign(total), negate=True).tolist() == [0.0, 1.0, 0.0, 1.0]
    out = torch.empty(4)
    assert elected_sign(total, out=out) is out  # in place, as the kernels' chunk buffers use it


def _kernel(weights: list[float], lam: float, normalize: bool) -> torch.Tensor:
    others = [(key, i + 1, BASE + d) for i, (key, d) in enumerate(zip("ab", DELTAS))]
    params = {
        "weight": dict(zip("ab", weights)),
        "density": {"a": 1.0, "b": 1.0},
        "rescale": False,
        "normalize": normalize,
        "lambda": lam,
    }
    return merge_gta(get_method("ties"), BASE, others, params, name="t")


def _surrogate(weights: list[float], lam: float, normalize: bool) -> torch.Tensor:
    from evomerge.refine.differentiable import freeze, write_merged

    models = [BASE + d for d in DELTAS]
    ft = freeze(
        "t",
        BASE,
        models,
        get_method("ties"),
        [{"density": 1.0}, {"density": 1.0}],
        seed=0,
        positions=[1, 2],
        shared={"normalize": normalize},
    )
    out = torch.empty_like(BASE)
    write_merged(ft, weights, lam, out)
    return out


def _rows(weights: list[float], lam: float, normalize: bool) -> torch.Tensor:
    from evomerge.refine.rows import _Row, _ties

    models = [BASE + d for d in DELTAS]
    row = _Row("t", BASE, models, [lam * w for w in weights], torch.empty_like(BASE), None)
    row.densities, row.weights, row.lam, row.normalize = [1.0, 1.0], weights, lam, normalize
    theta, _ = _ties(row, [torch.ones(BASE.shape[0]) for _ in models])
    return theta.view_as(BASE)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, 0.3], [1.0, -0.5]])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernels_surrogate_and_rows_merge_alike(weights, normalize):
    lam = 0.8
    kernel = _kernel(weights, lam, normalize)
    torch.testing.assert_close(_surrogate(weights, lam, normalize), kernel, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_rows(weights, lam, normalize), kernel, rtol=1e-6, atol=1e-6)
    # by hand: the weighted deltas that agree with the sign of their sum, over the agreeing weights
    weighted = torch.stack([w * d for w, d in zip(weights, DELTAS)])
    keep = torch.sign(weighted) == elected_sign(weighted.sum(0))
    mixed = (weighted * keep).sum(0)
    if normalize:
        div = (torch.tensor(weights).view(-1, 1, 1) * keep).sum(0)
        mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    torch.testing.assert_close(kernel, BASE + lam * mixed, rtol=1e-6, atol=1e-6)
