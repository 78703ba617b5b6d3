"""The `mergekit-0.1.5` kernel set, and the parity kernels both sets use, give mergekit's exact bits.

Each case merges the same tensors twice through `merge_tensor`: once as evomerge runs them (the faster
parity kernels in merge/kernels/parity.py where they apply), once with mergekit's own kernel (evomerge's
kernels switched off), and compares the bits (not a tolerance). Shapes include a tensor above SLERP's
1M-element chunk, and deltas with exact zeros and tied magnitudes at the TIES boundary.
"""

from __future__ import annotations

import pytest
import torch

import evomerge.merge.kernels as kernels_module
from evomerge.merge.kernels import EVOMERGE_1, MERGEKIT, kernel_merge
from evomerge.merge.kernels.parity import magnitude_
from evomerge.merge.materialize import merge_tensor
from evomerge.merge.methods import get_method
from evomerge.merge.plan import TensorParams

INPUTS = ["base", "a", "b"]


def _tensors(shape, seed=0, dtype=torch.float32, zeros=0.0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base]
    for _ in range(2):
        delta = 0.1 * torch.randn(shape, generator=g)
        if zeros:
            delta[torch.rand(shape, generator=g) < zeros] = 0
        if ties:  # many deltas share a few magnitudes, so the density boundary falls inside a tie
            delta = (delta * 20).round() / 20
        out.append(base + delta)
    return [t.to(dtype) for t in out]


def _params(method_name, shared=None, per=None):
    method = get_method(method_name)
    shared = dict(shared or {})
    per_input = {}
    for spec in method.spec.parameters:
        if spec.scope.name == "SHARED":
            shared.setdefault(spec.name, spec.default)
    for key in INPUTS:
        values = {}
        for spec in method.spec.parameters:
            if spec.scope.name != "SHARED":
                values[spec.name] = (
                    (per or {}).get(key, {}).get(spec.name, (per or {}).get("*", {}).get(spec.name, spec.default))
                )
        per_input[key] = values
    return method, TensorParams(name="model.layers.0.mlp.up_proj.weight", t=0.0, shared=shared, per_input=per_input)


def _both(
    monkeypatch,
    method_name,
    tensors,
    inputs=INPUTS,
    base="base",
    shared=None,
    per=None,
    seed=7,
    out=None,
    kernels=MERGEKIT,
    **kw,
):
    """(evomerge's result with `kernels`, mergekit's own kernel's result) for the same binding and seed."""
    method, params = _params(method_name, shared, per)
    with monkeypatch.context() as m:
        m.setattr(kernels_module, "kernel_merge", lambda *a, **k: None)  # mergekit's kernel for everything
        theirs = merge_tensor(method, params, tensors, inputs, base, seed=seed, **kw)
    ours = merge_tensor(method, params, tensors, inputs, base, seed=seed, out=out, kernels=kernels, **kw)
    return ours, theirs


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


GTA_CASES = [
    ("ties", {}, {"*": {"weight": 1.0, "density": 0.5}}),
    (
        "ties",
        {"normalize": False, "lambda": 0.7},
        {"a": {"weight": 0.3, "density": 0.2}, "b": {"weight": 0.9, "density": 0.9}},
    ),
    ("ties", {"rescale": True, "int8_mask": True}, {"*": {"weight": 0.6, "density": 0.35}}),
    ("ties", {}, {"a": {"weight": 1.0, "density": 1.0}, "b": {"weight": 0.5, "density": 0.001}}),
    ("ties", {"rescale": True}, {"a": {"weight": -0.5, "density": 0.6}, "b": {"weight": 1.0, "density": 0.3}}),
]


@pytest.mark.parametrize("method_name,shared,per", GTA_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(GTA_CASES)])
@pytest.mark.parametrize("shape", [(96, 80), (513,), (3, 7, 5)])
def test_ties_is_bit_identical(monkeypatch, method_name, shared, per, shape):
    tensors = _tensors(shape, seed=len(shape), zeros=0.3)
    ours, theirs = _both(monkeypatch, method_name, tensors, shared=shared, per=per)
    assert _bits_equal(ours, theirs), (ours - theirs).abs().max()
    assert not torch.equal(ours, tensors[0])  # the merge moved the base


@pytest.mark.parametrize("density", [0.05, 0.5, 0.77, 0.99])
def test_ties_boundary_ties_and_zero_threshold(monkeypatch, density):
    tensors = _tensors((64, 64), seed=3, zeros=0.6, ties=True)
    ours, theirs = _both(monkeypatch, "ties", tensors, per={"*": {"weight": 1.0, "density": density}})
    assert _bits_equal(ours, theirs)


def test_magnitude_keeps_exactly_the_top_k():
    from mergekit.sparsify import magnitude

    g = torch.Generator().manual_seed(1)
    for density in (0.1, 0.5, 0.9):
        delta = torch.randn(1000, generator=g)
        ours = magnitude_(delta.clone(), density)
        assert int((ours != 0).sum()) == int(density * 1000)
        assert _bits_equal(ours, magnitude(delta, density))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(64, 48), (1100, 1000), (7,)])
def test_slerp_is_bit_identical(monkeypatch, t, shape):
    base, a, _ = _tensors(shape, seed=5)
    ours, theirs = _both(monkeypatch, "slerp", [base, a], inputs=["base", "a"], shared={"t": t})
    assert _bits_equal(ours, theirs)


def test_slerp_collinear_inputs_fall_back_to_lerp_in_both(monkeypatch):
    base = torch.randn(50, 40)
    ours, theirs = _both(monkeypatch, "slerp", [base, 2 * base], inputs=["base", "a"], shared={"t": 0.25})
    assert _bits_equal(ours, theirs)
    assert torch.allclose(ours, 1.25 * base)


@pytest.mark.parametrize(
    "method_name,shared,per", [("ties", {}, {"*": {"weight": 1.0, "density": 0.5}}), ("slerp", {"t": 0.4}, None)]
)
def test_writing_into_the_destination_gives_the_same_bits(monkeypatch, method_name, shared, per):
    inputs = INPUTS if method_name != "slerp" else ["base", "a"]
    tensors = _tensors((40, 30), seed=9)[: len(inputs)]
    dest = torch.full((40, 30), float("nan"))
    ours, theirs = _both(monkeypatch, method_name, tensors, inputs=inputs, shared=shared, per=per, out=dest)
    assert ours is dest  # written in place, no temporary result
    assert _bits_equal(dest, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(monkeypatch, dtype):
    tensors = _tensors((33, 17), seed=11, dtype=dtype)
    ours, theirs = _both(monkeypatch, "ties", tensors, per={"*": {"weight": 1.0, "density": 0.4}})
    assert _bits_equal(ours, theirs)
    ours, theirs = _both(monkeypatch, "slerp", tensors[:2], inputs=["base", "a"], shared={"t": 0.6})
    assert _bits_equal(ours, theirs)


def _bound(method, params):
    per = {k: {m: params.per_input[m][k] for m in INPUTS[1:]} for k in params.per_input["a"]}
    return {**params.shared, **per}


def test_parity_kernels_cover_ties_and_slerp_and_decline_the_rest():
    """Only kernels the bench measured >= 1.5x faster replace mergekit's under mergekit-0.1.5."""
    tensors = _tensors((8, 8))
    method, params = _params("ties", per={"*": {"weight": 1.0, "density": 0.5}})
    assert kernel_merge(method, _bound(method, params), tensors, INPUTS, "base", kernels=MERGEKIT) is not None
    method, _ = _params("slerp")
    assert kernel_merge(method, {"t": 0.5}, tensors[:2], INPUTS[:2], "base", kernels=MERGEKIT) is not None
    for name in ("dare_ties", "dare_linear", "task_arithmetic", "della", "breadcrumbs_ties", "model_stock"):
        method, params = _params(name)
        assert kernel_merge(method, _bound(method, params), tensors, INPUTS, "base", kernels=MERGEKIT) is None, name
    mixed = [tensors[0], tensors[1].to(torch.bfloat16), tensors[2]]
    method, params = _params("ties", per={"*": {"weight": 1.0, "density": 0.5}})
    assert kernel_merge(method, _bound(method, params), mixed, INPUTS, "base", kernels=MERGEKIT) is None


EVERY_METHOD = [
    ("linear", {}, {"*": {"weight": 0.6}}),
    ("task_arithmetic", {"lambda": 0.8}, {"*": {"weight": 0.7}}),
    ("ties", {}, {"*": {"weight": 1.0, "density": 0.5}}),
    ("dare_ties", {}, {"*": {"weight": 0.5, "density": 0.4}}),
    ("dare_linear", {}, {"*": {"weight": 0.5, "density": 0.6}}),
    ("breadcrumbs", {}, {"*": {"weight": 1.0, "density": 0.8, "gamma": 0.05}}),
    ("breadcrumbs_ties", {}, {"*": {"weight": 0.6, "density": 0.7, "gamma": 0.02}}),
    ("della", {}, {"*": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}),
    ("della_linear", {}, {"*": {"weight": 0.4, "density": 0.6, "epsilon": 0.2}}),
    ("model_stock", {}, None),
    ("nuslerp", {}, {"*": {"weight": 0.5}}),
]


@pytest.mark.parametrize("method_name,shared,per", EVERY_METHOD, ids=[c[0] for c in EVERY_METHOD])
def test_mergekit_set_is_bit_identical_to_mergekit_for_every_method(monkeypatch, method_name, shared, per):
    """EVOMERGE_KERNELS=mergekit: mergekit's bytes, random masks included (same per-tensor seed)."""
    tensors = _tensors((40, 50), seed=4, zeros=0.2, ties=True)
    inputs, base = (INPUTS, "base")
    if method_name == "nuslerp":
        tensors, inputs = tensors[1:], INPUTS[1:]
        base = None
    monkeypatch.setenv("EVOMERGE_KERNELS", "mergekit")
    method, params = _params(method_name, shared, per)
    with monkeypatch.context() as m:
        m.setattr(kernels_module, "kernel_merge", lambda *a, **k: None)
        theirs = merge_tensor(method, params, tensors, inputs, base, seed=9)
    ours = merge_tensor(method, params, tensors, inputs, base, seed=9)  # kernels from the environment
    assert _bits_equal(ours, theirs)
    assert not torch.equal(ours, tensors[0])


def test_non_sparsifying_methods_are_mergekit_bits_under_evomerge_1_too(monkeypatch):
    tensors = _tensors((40, 50), seed=6)
    for method_name, shared, per in EVERY_METHOD:
        if method_name in kernels_module.SPARSIFYING:
            continue
        inputs, base, ts = (INPUTS, "base", tensors) if method_name != "nuslerp" else (INPUTS[1:], None, tensors[1:])
        ours, theirs = _both(
            monkeypatch, method_name, ts, inputs=inputs, base=base, shared=shared, per=per, kernels=EVOMERGE_1
        )
        assert _bits_equal(ours, theirs), method_name


@pytest.mark.parametrize("kernels", [EVOMERGE_1, MERGEKIT])
def test_dare_masks_keep_the_density_fraction(monkeypatch, kernels):
    tensors = _tensors((200, 200), seed=2)
    method, params = _params(
        "dare_linear", per={"a": {"weight": 1.0, "density": 0.3}, "b": {"weight": 0.0, "density": 1.0}}
    )
    merged = merge_tensor(method, params, tensors, INPUTS, "base", seed=1, kernels=kernels)
    kept = (merged != tensors[0]).float().mean().item()
    assert abs(kept - 0.3) < 0.01


def test_a_destination_on_another_device_gets_a_copy_not_a_direct_write():
    """A GPU-resident model (Materializer(device="cuda")): kernels compute beside the CPU inputs."""
    tensors = _tensors((6, 5))
    method, params = _params("ties", per={"*": {"weight": 1.0, "density": 0.5}})
    elsewhere = torch.empty((6, 5), device="meta")
    for kernels in (EVOMERGE_1, MERGEKIT):
        result = kernel_merge(method, _bound(method, params), tensors, INPUTS, "base", out=elsewhere, kernels=kernels)
        assert result is not elsewhere and result.device.type == "cpu"
