"""The functional interference probe (`evomerge audit CONFIG --probe`): verdict rules, and cells that are real
merges."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.analysis.probe import RegionProbe, regions_of, verdict
from evomerge.cli import main

OWNERS = {"t_add": "add", "t_rev": "reverse"}


@pytest.mark.parametrize(
    "need, harm, expected",
    [
        # reverse's vector costs t_add 20 points where reverse itself needs it: only a trade is possible
        ({"t_add": 30.0, "t_rev": 40.0}, {"t_add": 20.0, "t_rev": 0.0}, "conflict"),
        # ... and where t_add's owner does not need the region either: still reverse's own need that binds
        ({"t_add": 0.0, "t_rev": 40.0}, {"t_add": 20.0, "t_rev": 0.0}, "conflict"),
        # reverse's vector hurts t_add but reverse does not need the region: drop it there
        ({"t_add": 30.0, "t_rev": 2.0}, {"t_add": 20.0, "t_rev": 0.0}, "routable"),
        ({"t_add": 2.0, "t_rev": 3.0}, {"t_add": 0.0, "t_rev": 8.0}, "routable"),
        # both need it but neither change hurts the other's task: a plain sum keeps both
        ({"t_add": 30.0, "t_rev": 40.0}, {"t_add": 1.0, "t_rev": 2.0}, "quiet"),
    ],
)
def test_verdict(need, harm, expected):
    assert verdict(RegionProbe("layer 0", "layers.0.", need, harm, ""), OWNERS) == expected


def test_regions_cover_every_layer_then_the_kinds():
    labels = [label for label, _ in regions_of(3)]
    assert labels == ["layer 0", "layer 1", "layer 2", "attention", "MLP", "embeddings", "head"]
    assert dict(regions_of(12))["layer 1"] == "layers.1."  # substring filter: does not also match layers.10.


def test_audit_probe_on_the_tiny_zoo_scores_real_recipes(tiny_zoo, tmp_path, capsys):
    from evomerge.merge.materialize import Materializer
    from evomerge.merge.recipe import ModelEntry, Recipe
    from evomerge.scoring import Scorer, TaskSpec

    tasks = [{"name": "zoo_add_search", "subset": 40}, {"name": "zoo_reverse_search", "subset": 40}]
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "probe",
                "base_model": str(tiny_zoo / "base"),
                "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
                "method": "task_arithmetic",
                "tasks": {"search": tasks},
            }
        )
    )
    assert main(["audit", str(config), "--json", "--probe"]) == 0
    out = json.loads(capsys.readouterr().out)
    probe = out["probe"]
    assert probe["models"] == ["add", "reverse"]

    # each task belongs to the model best on it, if that beats the base: recomputed from each checkpoint on disk
    from transformers import AutoModelForCausalLM

    scorer = Scorer([TaskSpec(**t) for t in tasks], seed=0)
    tokenizer = Materializer([str(tiny_zoo / "add")], str(tiny_zoo / "base")).tokenizer
    own = {}
    for name in ("base", "add", "reverse"):
        raw = scorer.score(AutoModelForCausalLM.from_pretrained(str(tiny_zoo / name)), tokenizer)
        own[name] = {t: 100 * raw[t]["acc"] for t in raw}
    owners = {}
    for t in own["base"]:
        best = max(("add", "reverse"), key=lambda m: own[m][t])
        if own[best][t] > own["base"][t]:
            owners[t] = best
    assert probe["owners"] == owners and owners["zoo_add_search"] == "add"
    assert probe["unowned"] == [t for t in own["base"] if t not in owners]
    assert probe["alone"] == pytest.approx({t: own[m][t] for t, m in owners.items()})  # a model alone: its own weights

    # every verdict is the README's rule applied to the region's own numbers
    regions = probe["regions"]
    assert [r["region"] for r in regions] == [label for label, _ in regions_of(4)]
    for r in regions:
        assert r["verdict"] == verdict(RegionProbe(r["region"], r["filter"], r["need"], r["harm"], ""), owners), r
    assert probe["summary"] and all(line.startswith("Probe: ") for line in probe["summary"])
    routable = {r["region"] for r in regions if r["verdict"] == "routable"}
    assert {r for rs in probe["dropped"].values() for r in rs} <= routable
    assert set(probe["joint"]) == (set(probe["owners"]) if probe["dropped"] else set())

    # one cell recomputed independently: add without its own vector in layer 0, scored on its task
    mat = Materializer([str(tiny_zoo / "add"), str(tiny_zoo / "reverse")], str(tiny_zoo / "base"))
    mat.apply(
        Recipe(
            merge_method="task_arithmetic",
            base_model=str(tiny_zoo / "base"),
            models=[
                ModelEntry(
                    model=str(tiny_zoo / "add"),
                    parameters={"weight": [{"filter": "layers.0.", "value": 0.0}, {"value": 1.0}]},
                ),
                ModelEntry(model=str(tiny_zoo / "reverse"), parameters={"weight": 0.0}),
            ],
        )
    )
    acc = 100 * scorer.score(mat.model, mat.tokenizer)["zoo_add_search"]["acc"]
    layer0 = regions[0]
    assert layer0["need"]["zoo_add_search"] == pytest.approx(probe["alone"]["zoo_add_search"] - acc)


def test_routable_regions_are_dropped_together_from_the_model_that_hurts():
    from evomerge.analysis.probe import ProbeReport, drop_weights, routable_drops

    def region(label, flt, harm_add, need_rev, harm_rev=0.0):
        r = RegionProbe(label, flt, {"t_add": 30.0, "t_rev": need_rev}, {"t_add": harm_add, "t_rev": harm_rev}, "")
        r.verdict = verdict(r, OWNERS)
        return r

    report = ProbeReport(
        models=["add", "reverse"],
        owners=OWNERS,
        alone={},
        all_in={},
        controls={},
        regions=[
            region("layer 0", "layers.0.", harm_add=20.0, need_rev=50.0),  # conflict: reverse needs it
            region("layer 1", "layers.1.", harm_add=20.0, need_rev=2.0),  # routable: reverse's vector may go
            region("layer 2", "layers.2.", harm_add=1.0, need_rev=2.0),  # quiet
            region("embeddings", "embed_tokens", harm_add=9.0, need_rev=0.0),  # routable
        ],
    )
    assert [r.verdict for r in report.regions] == ["conflict", "routable", "quiet", "routable"]
    report.dropped = routable_drops(report)
    assert report.dropped == {"reverse": ["layer 1", "embeddings"]}  # add hurts nobody: it keeps weight 1
    assert drop_weights(report) == [
        1.0,
        [{"filter": "layers.1.", "value": 0.0}, {"filter": "embed_tokens", "value": 0.0}, {"value": 1.0}],
    ]


@pytest.mark.parametrize(("joint_rev", "costly"), [(70.0, True), (80.5, False)])
def test_the_summary_does_not_promise_what_the_joint_check_refutes(joint_rev, costly):
    """'routable' is a verdict on one region at a time; when dropping them together costs a task, the summary says
    so instead of advising a low weight there (and no '-0.0' appears anywhere)."""
    from evomerge.analysis.probe import ProbeReport, format_probe, probe_summary, routable_drops

    def region(label, flt, harm_add, need_rev):
        r = RegionProbe(label, flt, {"t_add": 30.0, "t_rev": need_rev}, {"t_add": harm_add, "t_rev": -0.01}, "")
        r.verdict = verdict(r, OWNERS)
        return r

    report = ProbeReport(
        models=["add", "reverse"],
        owners=OWNERS,
        alone={"t_add": 99.0, "t_rev": 96.0},
        all_in={"t_add": 60.0, "t_rev": 81.0},
        controls={"t_add": {"shuffled": 5.0, "noise": -0.02}, "t_rev": {"shuffled": 0.0, "noise": 1.0}},
        regions=[region("layer 1", "layers.1.", 20.0, 2.0), region("embeddings", "embed_tokens", 9.0, 0.0)],
    )
    report.dropped = routable_drops(report)
    report.joint = {"t_add": 75.0, "t_rev": joint_rev}
    text = "\n".join(probe_summary(report))
    assert "routable, one region at a time: layer 1, embeddings" in text and "(taken alone)" in text
    if costly:
        assert "that costs t_rev 11.0 points, so they are not free to drop" in text
        assert "can give those regions a low weight" not in text
    else:
        assert "every skill keeps its score, so a per-layer search can give those regions a low weight" in text
    table = format_probe(report)
    assert "-0.0" not in table and "+0.0" in table  # -0.01 points of harm and -0.02 of noise print as +0.0
