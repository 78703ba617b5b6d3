"""The method registry (evomerge/merge/registry.py) is the one place a method's facts live: each entry agrees with
mergekit's own spec, every list evomerge keeps derives from it, and every method has a space (or says why not), a
portfolio decision, a kernel where it sparsifies and a parity case."""

from __future__ import annotations

import pytest
import yaml

from evomerge.merge.registry import REGISTRY, REQUIRED, names
from evomerge.resources import SEARCH_SPACES

METHODS = sorted(REGISTRY)
MERGEKITS = sorted(names(evomerge_only=False))  # the methods mergekit 0.1.5 registers
OWN = sorted(names(evomerge_only=True))  # evomerge's own (the subspace merges)


@pytest.mark.parametrize("name", MERGEKITS)
def test_entry_agrees_with_mergekits_spec(name):
    from mergekit.merge_methods.base import ParameterScope

    from evomerge.merge.methods import get_method

    spec = {p.name: p for p in get_method(name).spec.parameters}
    ours = REGISTRY[name].params
    assert set(ours) == set(spec), "the entry lists mergekit's parameters, no more and no fewer"
    for pname, theirs in spec.items():
        mine = ours[pname]
        assert mine.required == theirs.required, pname
        if not theirs.required:
            assert mine.default == theirs.default, pname
        assert mine.per_model == (theirs.scope != ParameterScope.SHARED), pname


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_space_or_a_reason_and_a_portfolio_decision(name):
    info = REGISTRY[name]
    assert info.space is not None or info.no_space, "no space: the entry says why"
    assert not (info.space and info.no_space), "a reason for no space only where there is none"
    assert isinstance(info.portfolio, bool)
    if info.portfolio:
        assert info.space is not None, "the portfolio scores a method's default merge: its space's defaults"
    if info.space is not None:
        data = yaml.safe_load((SEARCH_SPACES / f"{info.space}.yaml").read_text())
        assert name in data["methods"], f"search_spaces/{info.space}.yaml lists {name}"


def test_the_space_yamls_methods_agree_with_the_registry():
    """A shipped space lists exactly the methods whose default space it is (so `method: X` without a
    `search_space` and the portfolio pick the same file a reader would)."""
    for path in sorted(SEARCH_SPACES.glob("*.yaml")):
        listed = set(yaml.safe_load(path.read_text())["methods"])
        assert listed == {m for m, info in REGISTRY.items() if info.space == path.stem}, path.name


def test_the_derived_lists_come_from_the_registry():
    from evomerge.candidate.portfolio import COMMON_METHODS
    from evomerge.merge.kernels import SPARSIFYING
    from evomerge.merge.methods import METHODS as RUNNABLE
    from evomerge.refine.tensor import REFINABLE

    assert RUNNABLE == tuple(REGISTRY)
    assert SPARSIFYING == {m for m, info in REGISTRY.items() if info.sparsifies}
    assert REFINABLE == {m for m, info in REGISTRY.items() if info.refinable}
    assert COMMON_METHODS == names(portfolio=True)
    assert COMMON_METHODS == (
        "task_arithmetic",
        "ties",
        "dare_ties",
        "della",
        "breadcrumbs",
        "slerp",
        "sce",
        "multislerp",
        "tsv_m",
        "iso_c",
        "iso_cts",
    )


def test_every_method_mergekit_registers_is_registered():
    """Every method mergekit 0.1.5 registers runs in `evomerge merge` (so each has a parity case,
    tests/test_merge_parity.py); the others are evomerge's own, which mergekit does not have."""
    from mergekit.merge_methods.registry import registered_methods

    theirs = {m.spec.name for m in registered_methods()}
    assert len(theirs) == 20 and set(MERGEKITS) == theirs
    assert OWN == ["iso_c", "iso_cts", "tsv_m"] and not set(OWN) & theirs


@pytest.mark.parametrize("name", OWN)
def test_an_evomerge_only_method_has_its_spec_from_the_entry_a_paper_and_a_formula_test(name):
    """mergekit has no spec for it: evomerge builds one from the entry (same binding and checks as mergekit's own);
    it names its paper, and its reference is a test against the paper's formula (tests/test_subspace.py), in place
    of a parity case."""
    from pathlib import Path

    from mergekit.merge_methods.base import ParameterScope

    from evomerge.merge.methods import get_method

    info = REGISTRY[name]
    spec = {p.name: p for p in get_method(name).spec.parameters}
    assert set(spec) == set(info.params) and {"weight", "lambda"} <= set(spec)
    for pname, mine in info.params.items():
        assert spec[pname].default == mine.default and mine.per_model == (spec[pname].scope != ParameterScope.SHARED)
    assert info.params["weight"].per_model and not info.params["lambda"].per_model
    assert info.paper and not info.sparsifies
    formula_tests = (Path(__file__).parent / "test_subspace.py").read_text()
    assert f"def test_{name}_is_the_papers_formula(" in formula_tests


@pytest.mark.parametrize("name", METHODS)
def test_refinable_and_sparsifying_methods_are_the_task_arithmetic_family(name):
    """The refinement differentiates base + lambda * (weighted task vectors), and evomerge-1's own kernel
    (kernels/gta.py) runs mergekit's generalized task arithmetic: an entry cannot claim either elsewhere."""
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    from evomerge.merge.methods import get_method

    info = REGISTRY[name]
    family = isinstance(get_method(name), GeneralizedTaskArithmeticMerge)
    if info.evomerge_only:  # refinable where its surrogate exists (tsv_m: refine/differentiable.py), else it says why
        assert info.refinable != bool(info.no_refine)
    else:
        assert info.refinable == family
    if info.sparsifies:
        assert family and get_method(name).sparsification_method is not None


def test_max_models_comes_from_the_registry_where_the_space_sets_none():
    from evomerge.candidate.space import SpaceSpec, load_space_spec

    assert load_space_spec("slerp").max_models == REGISTRY["slerp"].max_models == 1
    assert load_space_spec("ties").max_models is None
    inline = SpaceSpec.model_validate({"methods": ["slerp"], "parameters": {"t": {"low": 0.0, "high": 1.0}}})
    assert inline.max_models == 1
    assert "max_models" in inline.model_dump(exclude_none=True), "the resolved config records it, as before"


def test_intervals_bound_recipes_and_spaces():
    from evomerge.candidate.space import SpaceSpec
    from evomerge.errors import ConfigError
    from evomerge.merge.registry import interval

    assert str(interval(["ties"], "density")) == "(0, 1]" and 0.0 not in interval(["ties"], "density")
    assert str(interval(["della"], "epsilon")) == "[0, 1)" and interval(["ties"], "epsilon") is None
    with pytest.raises(ValueError, match=r"leaves \(0, 1\]"):
        SpaceSpec.model_validate({"methods": ["ties"], "parameters": {"density": {"low": 0.0, "high": 1.0}}})
    assert REGISTRY["ties"].params["weight"].default is REQUIRED
    from evomerge.merge.recipe import Recipe

    with pytest.raises(ConfigError, match=r"gamma must be in \[0, 1\), got 1.0"):
        Recipe.model_validate(
            {
                "merge_method": "breadcrumbs",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 1.0, "gamma": 1.0}}],
            }
        )
