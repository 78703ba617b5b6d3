"""The subspace merges (tsv_m, iso_c, iso_cts; evomerge-only): each function against the paper's formula written
out independently here with numpy's SVD, the two properties any correct implementation has at weight 1 and lambda
1, and `evomerge merge` running each from a recipe that says it is evomerge-only, byte for byte twice, while
mergekit-yaml refuses it. These methods have no mergekit reference: the formula tests are their reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge.kernels import subspace
from evomerge.merge.recipe import Recipe

SHAPES = [(24, 16), (16, 24), (20, 20)]


def _tasks(shape, n=3, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * (i + 1) for i in range(n)]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))


def _orth(a: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


# -- the papers' formulas, written out with numpy ------------------------------------------------------------------
def tsv_m_formula(taus, weights, ks):
    """TSV-M: top k_i singular triplets of each w_i tau_i, U^ and V^ concatenated and orthogonalised, S^ kept."""
    us, vs, ss = [], [], []
    for tau, w, k in zip(taus, weights, ks):
        u, s, vt = np.linalg.svd(w * tau, full_matrices=False)
        us.append(u[:, :k])
        vs.append(vt[:k].T)
        ss.append(s[:k])
    return _orth(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ _orth(np.hstack(vs)).T


def iso_c_formula(taus, weights):
    """Iso-C: sigma_bar U V^T of the task-arithmetic sum."""
    u, s, vt = np.linalg.svd(sum(w * t for w, t in zip(weights, taus)), full_matrices=False)
    return s.mean() * u @ vt


def iso_cts_formula(taus, weights, k, s_per_task):
    """Iso-CTS: the sum's top k directions, each task's top s directions off them, orthogonalised, flat spectrum."""
    weighted = [w * t for w, t in zip(weights, taus)]
    u, s, vt = np.linalg.svd(sum(weighted), full_matrices=False)
    uc = u[:, :k]
    us, vs, ss = [uc], [vt[:k].T], [s[:k]]
    for t in weighted:
        ut, st, vtt = np.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
        us.append(ut[:, :s_per_task])
        vs.append(vtt[:s_per_task].T)
        ss.append(st[:s_per_task])
    return np.concatenate(ss).mean() * _orth(np.hstack(us)) @ _orth(np.hstack(vs)).T


def _close(ours: torch.Tensor, theirs: np.ndarray) -> None:
    np.testing.assert_allclose(ours.double().numpy(), theirs, rtol=2e-4, atol=2e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_m_is_the_papers_formula(shape):
    taus = _tasks(shape)
    weights, fractions = [1.0, 0.6, -0.8], [1.0, 0.5, 0.25]
    r = min(shape)
    ks = [int(r * f / 1.75) for f in fractions]  # the fractions sum past 1: scaled down to keep sum k_i <= r
    assert subspace.kept_ranks(r, fractions) == ks
    ours = subspace.tsv_m([_t(t) for t in taus], weights, fractions)
    _close(ours, tsv_m_formula(taus, weights, ks))
    # the paper's default: r / T directions from each task
    ours = subspace.tsv_m([_t(t) for t in taus], [1.0] * 3)
    _close(ours, tsv_m_formula(taus, [1.0] * 3, [r // 3] * 3))


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_is_the_papers_formula(shape):
    taus = _tasks(shape, seed=1)
    for weights in ([1.0, 1.0, 1.0], [0.3, 1.2, -0.5]):
        _close(subspace.iso_c([_t(t) for t in taus], weights), iso_c_formula(taus, weights))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_is_the_papers_formula(shape, fraction):
    taus = _tasks(shape, seed=2)
    weights = [1.0, 0.7, 1.3]
    r = min(shape)
    s_per_task = (r - int(r * fraction)) // 3
    k = r - 3 * s_per_task
    assert subspace.common_size(r, fraction, 3) == (k, s_per_task)
    ours = subspace.iso_cts([_t(t) for t in taus], weights, fraction)
    _close(ours, iso_cts_formula(taus, weights, k, s_per_task))


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    taus = [_t(t) for t in _tasks((24, 16), seed=3)]
    torch.testing.assert_close(subspace.iso_cts(taus, [1.0] * 3, 1.0), subspace.iso_c(taus, [1.0] * 3))


def test_iso_c_has_a_flat_spectrum_at_weight_1():
    """Every non-zero singular value of Iso-C's merged task vector equals their mean."""
    taus = [_t(t) for t in _tasks((48, 32), seed=4)]
    values = torch.linalg.svdvals(subspace.iso_c(taus, [1.0] * 3).double())
    nonzero = values[values > 1e-6 * values.max()]
    assert len(nonzero) == 32
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, float(nonzero.mean())), rtol=1e-5, atol=0)
    summed = torch.linalg.svdvals(sum(taus).double())
    assert summed.max() / summed.min() > 2, "the sum's own spectrum is far from flat: the test could fail"


def test_tsv_m_keeps_each_tasks_own_singular_values_at_weight_1():
    """Every singular value of TSV-M's merged task vector is one of the tasks' own (their top r / T)."""
    taus = [_t(t) for t in _tasks((48, 30), seed=5)]
    merged = torch.linalg.svdvals(subspace.tsv_m(taus, [1.0] * 3).double())
    own = torch.cat([torch.linalg.svdvals(t.double())[:10] for t in taus])
    assert len(merged) == 30
    for value in merged:
        assert torch.min((own - value).abs()) < 1e-4 * float(value), float(value)


def test_vectors_and_embeddings_merge_by_the_weighted_mean_of_the_task_vectors():
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    from evomerge.merge.methods import get_method

    g = torch.Generator().manual_seed(6)
    for name, shape in [("model.norm.weight", (16,)), ("model.embed_tokens.weight", (40, 16))]:
        base, a, b = (torch.randn(*shape, generator=g) for _ in range(3))
        group = TensorGroup.from_tensors([base, a, b], ids=["base", "a", "b"], base_index=0, name=name)
        weight = PerInputValues([("a", 0.3), ("b", 0.9)])
        for method in ("tsv_m", "iso_c", "iso_cts"):
            params = {"weight": weight, "lambda": 1.5, "common_fraction": 0.8}
            params["rank_fraction"] = PerInputValues([("a", 1.0), ("b", 1.0)])
            (out,) = get_method(method)._execute_resolved((group,), [params])
            expect = base + 1.5 * (0.3 * (a - base) + 0.9 * (b - base)) / 1.2
            torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)


def test_the_svd_cache_gives_the_bytes_a_fresh_svd_gives():
    """TSV-M's per-task SVDs are kept between trials: a merge from the cache is the merge without it."""
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    from evomerge.merge.methods import get_method

    g = torch.Generator().manual_seed(7)
    base, a, b = (torch.randn(24, 16, generator=g) for _ in range(3))
    name = "model.layers.0.mlp.up_proj.weight"
    group = TensorGroup.from_tensors([base, a, b], ids=["base", "a", "b"], base_index=0, name=name)
    params = {
        "weight": PerInputValues([("a", 0.8), ("b", 1.1)]),
        "lambda": 0.9,
        "rank_fraction": PerInputValues([("a", 0.5), ("b", 0.25)]),
    }
    subspace.SVD_CACHE.clear()
    (fresh,) = get_method("tsv_m")._execute_resolved((group,), [params])
    assert len(subspace.SVD_CACHE.entries) == 2
    (cached,) = get_method("tsv_m")._execute_resolved((group,), [params])
    assert torch.equal(fresh, cached)
    changed = TensorGroup.from_tensors([base, a + 1, b], ids=["base", "a", "b"], base_index=0, name=name)
    (other,) = get_method("tsv_m")._execute_resolved((changed,), [params])
    assert len(subspace.SVD_CACHE.entries) == 3 and not torch.equal(other, fresh), "a changed input is a new key"


# -- from a recipe -------------------------------------------------------------------------------------------------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


RECIPES = {
    "tsv_m": {"rank_fraction": 0.7},
    "iso_c": {},
    "iso_cts": {"common_fraction": 0.6},
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_evomerge_merge_runs_it_from_a_recipe_byte_for_byte(tiny_zoo, tmp_path, method):
    own = dict(RECIPES[method])
    shared = {k: own.pop(k) for k in ("common_fraction",) if k in own}
    text = Recipe.from_dict(
        {
            "merge_method": method,
            "base_model": str(tiny_zoo / "base"),
            "models": [
                {"model": str(tiny_zoo / "add"), "parameters": {"weight": 0.8, **own}},
                {"model": str(tiny_zoo / "reverse"), "parameters": {"weight": 1.1, **own}},
            ],
            "parameters": {"lambda": 0.9, **shared},
        }
    ).to_yaml()
    assert text.startswith(f"# evomerge-only: merge_method {method} is evomerge's own")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["merge", str(path), "--out", str(tmp_path / "one")]) == 0
    subspace.SVD_CACHE.clear()  # the second merge computes every SVD again
    assert main(["merge", str(path), "--out", str(tmp_path / "two")]) == 0
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    base, add, rev = (_weights(tiny_zoo / n) for n in ("base", "add", "reverse"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(one[q], base[q] + 0.9 * (0.8 * (add[q] - base[q]) + 1.1 * (rev[q] - base[q])))
    written = (tmp_path / "one" / "recipe.yaml").read_text()
    assert written.startswith("# evomerge-only") and Recipe.load(tmp_path / "one" / "recipe.yaml").own_method


def test_mergekit_yaml_refuses_the_recipe(tiny_zoo, tmp_path):
    recipe = Recipe.from_dict(
        {"merge_method": "iso_c", "base_model": str(tiny_zoo / "base"), "models": [{"model": str(tiny_zoo / "add")}]}
    )
    path = tmp_path / "recipe.yaml"
    recipe.dump(path)
    cli = Path(sys.executable).with_name("mergekit-yaml")
    done = subprocess.run([str(cli), str(path), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "iso_c" in (done.stdout + done.stderr)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# -- the refinement's surrogate (tsv_m) ----------------------------------------------------------------------------
def _tsv_m_merge(name, base, models, weights, lam, fractions) -> torch.Tensor:
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    from evomerge.merge.methods import get_method

    ids = [f"m{i}" for i in range(len(models))]
    group = TensorGroup.from_tensors([base, *models], ids=["base", *ids], base_index=0, name=name)
    params = {
        "weight": PerInputValues(list(zip(ids, weights))),
        "lambda": lam,
        "rank_fraction": PerInputValues(list(zip(ids, fractions))),
    }
    (out,) = get_method("tsv_m")._execute_resolved((group,), [params])
    return out


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"])
def test_tsv_m_surrogate_is_the_merge_and_its_gradient(name):
    """At fixed rank fractions TSV-M is linear in weight and lambda: the surrogate writes the merge at any weights,
    and its gradient is the merge's own (central differences of real merges)."""
    from evomerge.merge.methods import get_method
    from evomerge.refine.differentiable import freeze, merged_grads, write_merged

    g = torch.Generator().manual_seed(8)
    shape = (24, 16) if "proj" in name else (16,)
    base, a, b = (torch.randn(*shape, generator=g) for _ in range(3))
    fractions = [0.5, 0.25]
    params = [{"weight": 1.0, "rank_fraction": f} for f in fractions]
    frozen = freeze(name, base, [a, b], get_method("tsv_m"), params, seed=0, positions=[0, 1], shared={"lambda": 1.0})
    out = torch.empty_like(base)
    for weights, lam in (([1.0, 1.0], 1.0), ([0.4, -0.7], 1.3)):
        write_merged(frozen, weights, lam, out)
        expect = _tsv_m_merge(name, base, [a, b], weights, lam, fractions)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    grad = torch.randn(*shape, generator=g)
    weights, lam, h = [0.6, 0.9], 1.1, 1e-2
    ours = merged_grads(frozen, weights, lam, grad.clone())

    def loss(w, la):
        return float((grad.double() * _tsv_m_merge(name, base, [a, b], w, la, fractions).double()).sum())

    numeric = [
        (loss([weights[0] + h, weights[1]], lam) - loss([weights[0] - h, weights[1]], lam)) / (2 * h),
        (loss([weights[0], weights[1] + h], lam) - loss([weights[0], weights[1] - h], lam)) / (2 * h),
        (loss(weights, lam + h) - loss(weights, lam - h)) / (2 * h),
    ]
    np.testing.assert_allclose(ours, numeric, rtol=2e-3, atol=2e-3)


def test_a_tsv_m_searchs_only_a_model_baseline_is_that_model(tiny_zoo, tmp_path):
    """The space's "only add" point keeps all of add's directions and none of reverse's: add's own weights."""
    from evomerge.candidate.baseline import BaselineLabel
    from evomerge.candidate.space import SearchSpace, load_space_spec

    models = [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")]
    space = SearchSpace.over(load_space_spec("tsv_m"), tiny_zoo / "base")
    points = dict(space.baselines(models))
    point = points[BaselineLabel.alone("add")]
    recipe = space.to_recipe(point, models, str(tiny_zoo / "base"), "tsv_m", 0)
    path = tmp_path / "recipe.yaml"
    recipe.dump(path)
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 0
    out, add = _weights(tmp_path / "out"), _weights(tiny_zoo / "add")
    for name, tensor in add.items():
        torch.testing.assert_close(out[name], tensor, rtol=1e-4, atol=1e-5)


def test_a_merge_by_another_method_empties_the_svd_cache():
    """A search of another method scores TSV-M's default merge once (its portfolio): the SVDs are not kept."""
    from evomerge.merge.materialize import merge_tensor
    from evomerge.merge.methods import get_method
    from evomerge.merge.plan import TensorParams

    g = torch.Generator().manual_seed(9)
    base, a = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    name = "model.layers.0.mlp.up_proj.weight"
    _tsv_m_merge(name, base, [a], [1.0], 1.0, [1.0])
    assert subspace.SVD_CACHE.used > 0
    shared = {"lambda": 1.0, "normalize": False, "int8_mask": False, "rescale": False}
    per = {"base": {}, "a": {"weight": 1.0, "density": 1.0}}
    merge_tensor(get_method("task_arithmetic"), TensorParams(name, 0.0, shared, per), [base, a], ["base", "a"], "base")
    assert subspace.SVD_CACHE.used == 0 and not subspace.SVD_CACHE.entries
