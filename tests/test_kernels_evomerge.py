"""The `evomerge-1` kernel set: its documented rules, its determinism, and how it relates to mergekit's.

- the same bytes for 1 and 2 threads, any chunk size, and in another process;
- TIES / breadcrumbs: the documented order (magnitude descending, lowest flat index first) decides,
  exactly mergekit's kept count; mergekit's result differs only where a magnitude equals the boundary;
- DARE / DELLA: kept fraction within a binomial bound, rescaled values by mergekit's rule, masks from
  the counter stream (not the global RNG), one stream per (seed, tensor, input).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

import evomerge.merge.kernels.select as select
from evomerge.merge.kernels import EVOMERGE_1, MERGEKIT, SPARSIFYING
from evomerge.merge.kernels.counter import random_bits, stream_key
from evomerge.merge.kernels.gta import merge_gta
from evomerge.merge.kernels.l1 import block_sums, totals
from evomerge.merge.materialize import merge_tensor
from evomerge.merge.methods import get_method
from evomerge.merge.plan import TensorParams

INPUTS = ["base", "a", "b"]
NAME = "model.layers.0.mlp.up_proj.weight"
CASES = {
    "ties": {"weight": 0.7, "density": 0.3},
    "dare_ties": {"weight": 0.6, "density": 0.4},
    "dare_linear": {"weight": 0.5, "density": 0.7},
    "breadcrumbs": {"weight": 1.0, "density": 0.6, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 0.8, "density": 0.5, "gamma": 0.1},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.2},
    "della_linear": {"weight": 0.6, "density": 0.4, "epsilon": 0.1},
}


def _params(method_name: str, per: dict, shared: dict | None = None):
    method = get_method(method_name)
    values = {s.name: s.default for s in method.spec.parameters if s.scope.name == "SHARED"}
    values.update(shared or {})
    per_input = {
        k: {s.name: per.get(s.name, s.default) for s in method.spec.parameters if s.scope.name != "SHARED"}
        for k in INPUTS
    }
    return method, TensorParams(name=NAME, t=0.0, shared=values, per_input=per_input)


def _bound(params: TensorParams) -> dict:
    per = {k: {m: params.per_input[m][k] for m in INPUTS[1:]} for k in params.per_input["a"]}
    return {**params.shared, **per}


def _inputs(shape=(300, 700), seed=0, dtype=torch.float32, step=None):
    """base + two fine-tunes; `step` rounds the deltas to multiples of it (many equal magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    out = [base]
    for _ in range(2):
        delta = torch.randn(shape, generator=g) * 0.002
        if step:
            delta = (delta / step).round() * step
        out.append(base + delta)
    return [t.to(dtype) for t in out]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _merge(method_name, tensors, kernels=EVOMERGE_1, seed=5, **shared):
    method, params = _params(method_name, CASES[method_name], shared)
    return merge_tensor(method, params, tensors, INPUTS, "base", seed=seed, kernels=kernels)


# ---- determinism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method_name", sorted(CASES))
def test_same_bytes_for_one_and_two_threads_and_any_chunk(method_name):
    tensors = _inputs(step=1e-4)  # 210K elements: several chunks, the sampled bracket, ties at the boundary
    method, params = _params(method_name, CASES[method_name])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge_tensor(method, params, tensors, INPUTS, "base", seed=5, kernels=EVOMERGE_1)
        torch.set_num_threads(2)
        two = merge_tensor(method, params, tensors, INPUTS, "base", seed=5, kernels=EVOMERGE_1)
    finally:
        torch.set_num_threads(threads)
    others = [("a", 1, tensors[1]), ("b", 2, tensors[2])]  # positions in INPUTS
    small = merge_gta(method, tensors[0], others, _bound(params), seed=5, name=NAME, chunk=4096)
    assert _digest(one) == _digest(two) == _digest(small)
    assert torch.get_num_threads() == threads  # the kernel's worker threads leave the setting alone


_CHILD = """
import hashlib, json, sys, torch
sys.path.insert(0, {tests!r})
from test_kernels_evomerge import CASES, _digest, _inputs, _merge
tensors = _inputs(step=1e-4)
print(json.dumps({{m: _digest(_merge(m, tensors)) for m in CASES}}))
"""


def test_same_bytes_in_another_process_with_other_threads():
    """Another process, two torch threads there and one here, tensors merged in another order."""
    here = {m: _digest(_merge(m, _inputs(step=1e-4))) for m in reversed(sorted(CASES))}
    env = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    code = _CHILD.format(tests=str(__import__("pathlib").Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == here


def test_random_masks_ignore_the_global_rng_and_differ_per_input_and_seed():
    tensors = _inputs(shape=(64, 64))
    torch.manual_seed(0)
    first = _merge("dare_linear", tensors)
    torch.manual_seed(123)
    torch.rand(1000)
    assert torch.equal(first, _merge("dare_linear", tensors))
    assert not torch.equal(first, _merge("dare_linear", tensors, seed=6))
    a, b = (random_bits(stream_key(5, NAME, i), 0, 4096) for i in (1, 2))
    assert (a == b).float().mean() < 0.01  # the two inputs' streams are unrelated


def test_counter_stream_is_the_documented_formula():
    def reference(key, j):  # the module docstring's formula, in plain Python
        k0, k1 = key
        m = 0xFFFFFFFF
        x = (j + k0) & m
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= k1
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x - (1 << 32) if x >= 1 << 31 else x

    key = stream_key(3, "w", 1)
    start = (1 << 32) - 5  # also crosses the 2^32 segment boundary
    bits = random_bits(key, 0, 70).tolist()
    assert bits == [reference(key, j) for j in range(70)]
    far = random_bits(key, start, 10).tolist()
    assert far[:5] == [reference(key, j) for j in range(start, start + 5)]
    assert far[5:] != [reference(key, j) for j in range(start + 5, start + 10)]  # next segment: derived key


# ---- magnitude rules --------------------------------------------------------------------------------
def _first_k(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """The documented order, brute force: magnitude descending, then lowest flat index."""
    order = sorted(range(magnitudes.numel()), key=lambda i: (-magnitudes[i].item(), i))
    keep = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep


@pytest.mark.parametrize("exact_below", [1 << 16, 0])  # the direct path and the sampled bracket
def test_top_k_is_the_documented_order(monkeypatch, exact_below):
    monkeypatch.setattr(select, "EXACT_BELOW", exact_below)
    monkeypatch.setattr(select, "SAMPLE", 32)  # a tiny sample: the bracket often misses and falls back
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        n = int(torch.randint(2, 1500, (1,), generator=g))
        a = ((torch.randn(n, generator=g) * 3).round() / 3).abs()
        if trial % 3 == 0:
            a[torch.rand(n, generator=g) < 0.5] = 0
        count = int(torch.randint(1, n, (1,), generator=g))
        chunk = int(torch.randint(1, 400, (1,), generator=g))
        sel = select.top_k(
            n, count, lambda s, e, out: torch.abs(a[s:e], out=out[: e - s]), lambda st: a[::st], chunk, a
        )
        mask = sel.mask_into(a, 0, torch.empty(n)).bool()
        nonzero = a != 0
        assert torch.equal(mask & nonzero, _first_k(a, count) & nonzero)
        if sel.threshold != 0:
            assert int(mask.sum()) == count


def test_breadcrumbs_keeps_the_documented_band():
    base = torch.zeros(400)
    g = torch.Generator().manual_seed(2)
    model = (torch.randn(400, generator=g) * 4).round() / 4 + 0.01  # ties, no zeros
    method, params = _params("breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": 0.1})
    out = merge_gta(
        method,
        base,
        [("a", 1, model)],
        _bound(params) | {"density": {"a": 0.5}, "gamma": {"a": 0.1}, "weight": {"a": 1.0}},
    )
    keep, top = int(0.5 * 400), int(0.1 * 400)  # mergekit's counts
    expected = _first_k(model.abs(), top + keep) & ~_first_k(model.abs(), top)
    assert torch.equal(out != 0, expected)
    assert torch.equal(out[expected], model[expected])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_equals_mergekit_except_at_boundary_ties(dtype):
    """Same kept count per task vector; where the merges differ, some task vector's magnitude equals its
    boundary value (the count-th largest), where mergekit's unstable argsort picks other elements."""
    from mergekit.sparsify import magnitude

    tensors = _inputs(shape=(200, 300), dtype=dtype, step=2e-4 if dtype == torch.float32 else None)
    ours, theirs = _merge("ties", tensors), _merge("ties", tensors, kernels=MERGEKIT)
    deltas = [(t - tensors[0]).reshape(-1) for t in tensors[1:]]
    n, k = deltas[0].numel(), max(1, int(CASES["ties"]["density"] * deltas[0].numel()))
    at_boundary = torch.zeros(n, dtype=torch.bool)
    for d in deltas:
        a = d.abs().float()
        boundary = a.kthvalue(n - k + 1).values
        ours_kept = select.top_k(
            n, k, lambda s, e, o: torch.abs(d[s:e], out=o[: e - s]), lambda st: d[::st].abs(), 1 << 16, d
        )
        kept = ours_kept.mask_into(d.abs(), 0, torch.empty(n)).bool()
        theirs_kept = magnitude(d.clone(), CASES["ties"]["density"]) != 0
        assert int(kept.sum()) == k and int(theirs_kept.sum()) == k  # no zero deltas here
        assert torch.all(a[kept != theirs_kept] == boundary)
        at_boundary |= a == boundary
    differ = (ours != theirs).reshape(-1)
    assert differ.any() or dtype == torch.float32  # bf16 deltas tie at the boundary: the rule matters
    assert torch.all(at_boundary[differ])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method_name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_without_ties_magnitude_methods_equal_mergekit(method_name, dtype):
    tensors = _inputs(shape=(300, 400), dtype=dtype)  # 120K elements: the sampled bracket
    assert torch.equal(_merge(method_name, tensors), _merge(method_name, tensors, kernels=MERGEKIT))


# ---- random rules --------------------------------------------------------------------------------------
def _prune_alone(method_name, model, density, rescale, **extra):
    """The pruned task vector itself: base 0, one input of weight 1 (so the merge returns it exactly)."""
    method, params = _params(method_name, {})
    bound = {
        **params.shared,
        "rescale": rescale,
        "normalize": False,
        "lambda": 1.0,
        "weight": {"a": 1.0},
        "density": {"a": density},
        **{k: {"a": v} for k, v in extra.items()},
    }
    return merge_gta(method, torch.zeros_like(model), [("a", 1, model)], bound, seed=2, name=NAME)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_a_binomial_fraction_and_rescales_by_mergekits_rule(density):
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    n = 200_000
    model = torch.randn(n, generator=torch.Generator().manual_seed(3)) + 1e-3  # no exact zeros
    plain = _prune_alone("dare_linear", model, density, rescale=False)
    kept = plain != 0
    bound = 5 * math.sqrt(n * density * (1 - density))
    assert abs(int(kept.sum()) - density * n) < bound
    assert torch.equal(plain[kept], model[kept])
    scaled = _prune_alone("dare_linear", model, density, rescale=True)
    assert torch.equal(scaled != 0, kept)  # the same stream decides, rescaled or not
    rule = rescaled_masked_tensor(model, kept.float(), RescaleNorm.l1)  # mergekit's rule on our mask
    torch.testing.assert_close(scaled, rule, rtol=3e-7, atol=0)  # only their sums' rounding differs
    exact = model.double().abs().sum() / model.double().abs()[kept].sum()
    assert abs(scaled[kept][0].item() / model[kept][0].item() - exact.item()) < 1e-6


def test_della_keeps_its_expected_fraction_with_more_of_the_large():
    rows, cols, density, epsilon = 200, 500, 0.5, 0.3
    model = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    kept = _prune_alone("della_linear", model, density, rescale=False, epsilon=epsilon) != 0
    n = rows * cols
    assert abs(int(kept.sum()) - density * n) < 5 * math.sqrt(n * 0.25)
    ranks = model.abs().argsort(dim=1).argsort(dim=1)
    small, large = kept[ranks < cols // 4].float().mean(), kept[ranks >= 3 * cols // 4].float().mean()
    assert small < density - epsilon / 2 < density + epsilon / 2 < large  # magnitude-ranked probabilities


@pytest.mark.parametrize("tail,bound", [(0, 1e-8), (8, 4e-7)])  # gaussian magnitudes; a heavy tail (x rand^8)
def test_fixed_point_l1_sums_are_order_free_and_accurate(tail, bound):
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(50_000, generator=g) * torch.rand(50_000, generator=g) ** tail).abs()
    mask = (torch.rand(50_000, generator=g) < 0.3).float()
    whole = totals([block_sums(a, mask)])
    pieces = totals([block_sums(a[s : s + 8192], mask[s : s + 8192]) for s in range(0, 50_000, 8192)][::-1])
    assert whole == pieces
    assert abs(whole[0] / a.double().sum().item() - 1) < bound  # a float32 rounding is ~6e-8
    assert abs(whole[1] / (a.double() * mask.double()).sum().item() - 1) < bound


def test_every_sparsifying_method_has_a_case():
    assert set(CASES) == SPARSIFYING
