"""`evomerge report` on the tiny zoo: a real (in-process) search, then the held-out comparison and its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.candidate.portfolio import default_recipe
from evomerge.cli import main
from evomerge.config.schema import load_run_config, parse_config
from evomerge.merge.recipe import Recipe
from evomerge.report import Comparison, Row, TrialRow, statement
from evomerge.report.markdown import render
from evomerge.run.driver import run_search
from evomerge.run.pool import InlinePool

SUBSET = 60  # held-out examples per task: a fixed seeded sample keeps the 9 evaluations quick
PNG = b"\x89PNG\r\n\x1a\n"


def search(root: Path, zoo: Path, name: str, method: str, sampler: dict, n_trials: int) -> Path:
    """A short real search (one evaluator in this process, no Ray) into `root/runs/<name>`."""
    cfg = parse_config(
        {
            "name": name,
            "base_model": str(zoo / "base"),
            "models": [str(zoo / "add"), str(zoo / "reverse")],
            "method": method,
            "search_space": method,
            "tasks": {
                "search": [{"name": "zoo_add_search", "subset": 20}, {"name": "zoo_reverse_search", "subset": 20}],
                "heldout": ["zoo_add", "zoo_reverse"],
            },
            "sampler": sampler,
            "budget": {"n_trials": n_trials},
            "workers": {"count": 0},  # search and report in this process (the report scores through the same pool)
            # the searched trials are what these tests read (the report scores every default merge itself): with the
            # portfolio, a subspace method's default merge can win a 5-trial study on the tiny zoo
            "portfolio": False,
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # run directories are relative to the working directory
        run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
    return root / cfg.run_dir


@pytest.fixture(scope="module")
def ties_report(tiny_zoo, tmp_path_factory):
    """(run_dir, Comparison, stdout) of `evomerge report` on a 5-trial TIES study."""
    import contextlib
    import io

    run_dir = search(
        tmp_path_factory.mktemp("report"), tiny_zoo, "rep", "ties", {"name": "cmaes", "options": {"popsize": 4}}, 5
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run_dir), "--limit-subset", str(SUBSET)]) == 0
    comparison = Comparison.model_validate_json((run_dir / "report" / "comparison.json").read_text())
    return run_dir, comparison, out.getvalue()


def test_report_files_and_stdout(ties_report):
    run_dir, c, stdout = ties_report
    report = run_dir / "report"
    for name in ("report.md", "comparison.json", "history.png", "best_params.png", "scores.png"):
        assert (report / name).stat().st_size > 0, name
    for name in ("history.png", "best_params.png", "scores.png"):
        assert (report / name).read_bytes()[:8] == PNG
        assert f"]({name})" in (report / "report.md").read_text()
    assert not (report / "pareto.png").exists(), "a single-objective study has no Pareto front"
    assert not list(report.glob(".*")), "no temp files left behind"
    assert f"report: {report / 'report.md'}" in stdout
    evolved = c.row("evolved (best trial)")
    assert f"{evolved.mean:.4f}" in stdout and "routing oracle" in stdout


def test_rows_cover_sources_defaults_oracle_and_evolved(ties_report):
    _, c, _ = ties_report
    assert [r.name for r in c.rows_of("source")] == ["base", "add", "reverse"]
    assert [r.name for r in c.rows_of("default")] == [
        "ties (defaults)",
        "task_arithmetic (defaults)",
        "dare_ties (defaults)",
        "della (defaults)",
        "breadcrumbs (defaults)",
        "sce (defaults)",
        "multislerp (defaults)",
        "tsv_m (defaults)",
        "iso_c (defaults)",
        "iso_cts (defaults)",
    ]
    assert "slerp" in c.skipped  # slerp merges the base with one model; this study merges two
    assert c.tasks == ["zoo_add", "zoo_reverse"] and c.metrics == {"zoo_add": "acc", "zoo_reverse": "acc"}
    for r in c.rows:
        assert set(r.scores) == set(c.tasks)
        assert r.mean == pytest.approx(sum(r.scores.values()) / len(r.scores))
    assert all(0.0 <= v <= 1.0 for r in c.rows for v in r.scores.values())
    assert len({tuple(r.scores.values()) for r in c.rows_of("source")}) == 3, "each source scored on its own weights"


def test_oracle_is_the_per_task_max_over_sources(ties_report):
    _, c, _ = ties_report
    sources = c.rows_of("source")
    oracle = c.row("routing oracle")
    for task in c.tasks:
        assert oracle.scores[task] == max(r.scores[task] for r in sources)
    assert oracle.mean >= max(r.mean for r in sources)


def test_default_rows_equal_scoring_the_default_merge_directly(ties_report):
    from evomerge.merge.materialize import Materializer
    from evomerge.scoring import Scorer, TaskSpec, evaluate_model_dir

    run_dir, c, _ = ties_report
    cfg = load_run_config(run_dir)
    specs = [TaskSpec(name=t, metric="acc", subset=SUBSET) for t in c.tasks]
    scorer = Scorer(specs, seed=cfg.seed)
    mat = Materializer([str(m) for m in cfg.models], str(cfg.base_model), dtype=cfg.dtype)
    for row in c.rows_of("default"):
        method = row.name.split(" ")[0]
        space = cfg.search_space if method == cfg.method else None
        mat.apply(default_recipe(method, cfg.base_model, cfg.models, cfg.seed, cfg.dtype, space=space))
        direct = scorer.score(mat.model, mat.tokenizer)
        assert row.scores == {t: direct[t]["acc"] for t in c.tasks}, method
    # a source row is its checkpoint, scored from disk
    disk = evaluate_model_dir(cfg.models[1], specs, seed=cfg.seed)
    assert c.row("reverse").scores == {t: disk[t]["acc"] for t in c.tasks}


def test_study_method_default_is_the_enqueued_baseline_trial(ties_report):
    from evomerge.study.storage import load_study

    run_dir, _, _ = ties_report
    cfg = load_run_config(run_dir)
    first = load_study(cfg.name, cfg.storage_url).trials[0]
    assert first.user_attrs["baseline"] == "defaults"
    ours = default_recipe(
        cfg.method, cfg.base_model, cfg.models, cfg.seed, cfg.dtype, space=cfg.search_space, kernels=cfg.kernels
    )
    assert ours == Recipe.from_yaml(first.user_attrs["recipe"])


def test_top_trials_and_evolved_row_come_from_the_study(ties_report):
    from evomerge.study.storage import load_study
    from evomerge.study.trials import best_trial, complete_trials, objective_of, ranked

    run_dir, c, _ = ties_report
    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    best = best_trial(study)
    top = ranked(complete_trials(study))[:3]  # the guard's ranking (whole trials), as status and export rank
    assert [t.number for t in c.trials] == [t.number for t in top]
    assert [t.search for t in c.trials] == [objective_of(t) for t in top]
    assert c.best_trial == best.number == c.trials[0].number
    assert c.row("evolved (best trial)").scores == c.trials[0].heldout


def test_statement_matches_the_numbers(ties_report):
    from evomerge.report.noise import paired_difference

    run_dir, c, _ = ties_report
    text = (run_dir / "report" / "report.md").read_text()
    evolved = c.row("evolved (best trial)")
    best_default = max(c.rows_of("default"), key=lambda r: r.mean)
    oracle = c.row("routing oracle")
    d = paired_difference(evolved, best_default)
    assert d.se is not None and d.n == 2 * SUBSET, "every row carries its per-example scores"
    if d.within_noise:
        assert "**within noise**" in text and "**beats**" not in text
    elif evolved.mean > best_default.mean:
        assert "**beats** the best default merge" in text and "NOT" not in text
    else:
        assert "does **NOT** beat the best default merge" in text
    assert d.se_text() in text and f"{(evolved.mean - best_default.mean) * 100:+.1f} points" in text
    assert f"{best_default.name}" in text.split("## Search")[0]
    assert f"{evolved.mean / oracle.mean * 100:.1f}% of the routing oracle" in text
    assert "%)" not in text.split("## Search")[0], "differences are absolute points, never a percent of a score"
    assert "### Is the difference more than noise?" in text


def test_per_example_scores_average_to_the_row_scores(ties_report):
    _, c, _ = ties_report
    for r in c.rows:
        assert set(r.examples) == set(c.tasks) and all(len(v) == SUBSET for v in r.examples.values()), r.name
        for t in c.tasks:
            assert sum(r.examples[t]) / SUBSET == pytest.approx(r.scores[t], abs=1e-12), (r.name, t)
            assert set(r.examples[t]) <= {0.0, 1.0}  # accuracy per example
    oracle, sources = c.row("routing oracle"), c.rows_of("source")
    for t in c.tasks:
        assert oracle.examples[t] == max(sources, key=lambda r: r.scores[t]).examples[t]


def _comparison(
    evolved: float, default: float, examples: dict[str, dict[str, list[float]]] | None = None
) -> Comparison:
    """Rows scoring (a, b); `examples`: {row name: {task: per-example values}} (their means are the scores)."""
    tasks = ["a", "b"]

    def row(name, kind, a, b):
        per = (examples or {}).get(name, {})
        return Row(name=name, kind=kind, scores={"a": a, "b": b}, mean=(a + b) / 2, detail=name, examples=per)

    sources = [row("base", "source", 0.2, 0.2), row("x", "source", 0.8, 0.3), row("y", "source", 0.3, 0.7)]
    from evomerge.report.compare import oracle_row

    rows = [*sources, row("ties (defaults)", "default", default, default), oracle_row(sources, tasks)]
    rows.append(row("evolved (best trial)", "evolved", evolved, evolved))
    trial = TrialRow(number=4, search=0.6, heldout={"a": evolved, "b": evolved}, heldout_mean=evolved)
    return Comparison(
        study="s",
        method="ties",
        sampler="cmaes",
        run_dir="r",
        n_complete=5,
        multi_objective=False,
        tasks=tasks,
        metrics={"a": "acc", "b": "acc"},
        subset=None,
        rows=rows,
        trials=[trial],
        best_trial=4,
    )


@pytest.mark.parametrize(("evolved", "default", "beats"), [(0.6, 0.5, True), (0.45, 0.5, False), (0.5, 0.5, False)])
def test_statement_says_plainly_when_the_recipe_does_not_beat_a_default(evolved, default, beats):
    c = _comparison(evolved, default)
    v = c.verdict()
    assert v.beats_default is beats and v.margin == pytest.approx(evolved - default)
    assert c.row("routing oracle").scores == {"a": 0.8, "b": 0.7}
    text = statement(v, "acc")
    if beats:
        assert "**beats**" in text and f"{(evolved - default) * 100:+.1f} points" in text
    else:
        assert "does **NOT** beat the best default merge, ties (defaults)" in text
        assert ("ties with it" if evolved == default else f"scores {(evolved - default) * 100:+.1f} points") in text
    assert "no per-example scores to judge the noise" in text  # these rows carry none: no claim about noise
    assert f"{evolved / 0.75 * 100:.1f}% of the routing oracle's mean (0.7500" in text
    assert statement(v, "acc") in render(c, {})


def _examples(mean: float, n: int, shift: int = 0) -> list[float]:
    """n accuracies (0/1) averaging `mean`, the ones starting at index `shift` (wrapping around)."""
    ones = round(mean * n)
    return [1.0 if (i - shift) % n < ones else 0.0 for i in range(n)]


def test_paired_difference_is_the_mean_difference_with_its_paired_standard_error():
    import numpy as np

    from evomerge.report.noise import paired_difference

    rng = np.random.default_rng(0)
    a = {t: rng.integers(0, 2, 300).astype(float).tolist() for t in ("a", "b")}
    b = {t: rng.integers(0, 2, 300).astype(float).tolist() for t in ("a", "b")}

    def row(name, ex):
        scores = {t: sum(v) / len(v) for t, v in ex.items()}
        return Row(name=name, kind="default", scores=scores, mean=sum(scores.values()) / 2, examples=ex)

    d = paired_difference(row("x", a), row("y", b))
    diffs = {t: np.array(a[t]) - np.array(b[t]) for t in a}
    se = np.sqrt(sum(x.var(ddof=1) / len(x) for x in diffs.values())) / 2  # mean over 2 tasks
    assert d.diff == pytest.approx(np.mean([x.mean() for x in diffs.values()])) and d.se == pytest.approx(se)
    assert d.n == 600 and d.within_noise == (abs(d.diff) < 2 * se)
    # pairing: what both solve cancels. A model against itself with 20 more examples of task a solved is beyond
    # noise paired, where two independent samples' standard error would call the same gap noise
    flipped = {t: list(v) for t, v in a.items()}
    for i in [i for i, v in enumerate(a["a"]) if v == 0][:20]:
        flipped["a"][i] = 1.0
    gain = paired_difference(row("x+20", flipped), row("x", a))
    unpaired = (
        np.sqrt(
            sum(
                np.var(x, ddof=1) / 300 + np.var(y, ddof=1) / 300
                for x, y in [(flipped["a"], a["a"]), (flipped["b"], a["b"])]
            )
        )
        / 2
    )
    assert gain.diff == pytest.approx(20 / 600) and not gain.within_noise and abs(gain.diff) < 2 * unpaired
    assert paired_difference(row("x", a), row("x", a)).within_noise, "identical rows: a tie, within noise"
    # per-example values that do not average to the score (e.g. perplexity) are no basis for a noise claim
    wrong = Row(name="w", kind="default", scores={"a": 0.9, "b": 0.9}, mean=0.9, examples=a)
    assert paired_difference(wrong, row("y", b)).se is None


def test_a_gain_within_noise_is_reported_as_noise_in_points_not_percent():
    n = 300  # per task; the evolved recipe solves 2 more examples of each task than the defaults: +0.67 points
    ex = {
        "evolved (best trial)": {"a": _examples(152 / n, n), "b": _examples(152 / n, n, shift=40)},
        "ties (defaults)": {"a": _examples(150 / n, n, shift=7), "b": _examples(150 / n, n, shift=100)},
    }
    c = _comparison(152 / n, 150 / n, ex)
    v = c.verdict()
    assert v.vs_default.diff == pytest.approx(2 / n) and v.vs_default.within_noise
    text = statement(v, "acc")
    assert "**within noise**" in text and "+0.7 points" in text and "**beats**" not in text
    assert "%)" not in text, "no percent of a score"
    assert f"paired SE {v.vs_default.se * 100:.1f} points over {2 * n} examples" in text
    table = "\n".join(render(c, {}).split("### Is the difference more than noise?")[1].splitlines()[:12])
    assert "| ties (defaults) | +0.7 |" in table and "within noise" in table
    # and the same gain on examples where the defaults are always wrong is beyond noise
    sure = {
        "evolved (best trial)": {"a": [1.0] * 30 + [0.0] * 270, "b": [1.0] * 30 + [0.0] * 270},
        "ties (defaults)": {"a": [0.0] * 300, "b": [0.0] * 300},
    }
    v = _comparison(0.1, 0.0, sure).verdict()
    assert not v.vs_default.within_noise and "**beats**" in statement(v, "acc")


def test_drops_name_the_tasks_below_their_best_source_beyond_noise():
    n = 200
    ex = {  # sources: x best on a (0.8), y best on b (0.7); evolved keeps b, loses a (0.5)
        "x": {"a": _examples(0.8, n), "b": _examples(0.3, n)},
        "y": {"a": _examples(0.3, n), "b": _examples(0.7, n)},
        "base": {"a": _examples(0.2, n), "b": _examples(0.2, n)},
        "evolved (best trial)": {"a": _examples(0.5, n), "b": _examples(0.7, n, shift=1)},
    }
    c = _comparison(0.6, 0.5, ex)
    evolved = c.row("evolved (best trial)").model_copy(update={"scores": {"a": 0.5, "b": 0.7}, "mean": 0.6})
    c = c.model_copy(update={"rows": [r if r.kind != "evolved" else evolved for r in c.rows]})
    drops = c.drops()
    assert [(t, src.name) for t, src, _ in drops] == [("a", "x")], "b is 0.7 against 0.7: no drop"
    assert drops[0][2].diff == pytest.approx(-0.3)


def test_multi_objective_report_has_a_pareto_front(tiny_zoo, tmp_path):
    from evomerge.report import build_report

    run_dir = search(tmp_path, tiny_zoo, "mo", "task_arithmetic", {"name": "nsga2", "seed": 0}, 4)
    result = build_report(run_dir, top_k=2, subset=20, log=None)
    assert result.comparison.multi_objective
    pareto = run_dir / "report" / "pareto.png"
    assert pareto.read_bytes()[:8] == PNG and "![Pareto front](pareto.png)" in result.report.read_text()
    assert len(result.comparison.trials) == 2


def test_report_errors_name_the_fix(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_default_recipes_come_from_the_search_space_defaults(tiny_zoo):
    from evomerge.candidate.portfolio import COMMON_METHODS, space_for
    from evomerge.errors import ConfigError
    from evomerge.merge.plan import Plan

    two = [tiny_zoo / "add", tiny_zoo / "reverse"]
    ties = default_recipe("ties", tiny_zoo / "base", two, seed=3)
    assert ties.merge_method == "ties" and ties.seed == 3
    plan = Plan(ties, num_layers=4)
    for tensor in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        add = plan.resolve(tensor, t=0.3).per_input[ties.models[0].model]
        assert add["weight"] == 1.0 and add["density"] == 0.5  # search_spaces/ties.yaml defaults
    for method in COMMON_METHODS:
        assert method in space_for(method).methods
    assert space_for("dare_linear").name == "dare_ties"  # found through a space's `methods` list
    slerp = default_recipe("slerp", tiny_zoo / "base", two[:1])
    assert [m.model for m in slerp.models] == [str(tiny_zoo / "base"), str(two[0])]
    assert Plan(slerp, num_layers=4).resolve("model.layers.2.self_attn.q_proj.weight", t=0.6).shared["t"] == 0.5
    with pytest.raises(ConfigError, match="at most 1 model"):
        default_recipe("slerp", tiny_zoo / "base", two)
    with pytest.raises(ConfigError, match="no search space"):
        space_for("model_stock")


@pytest.mark.parametrize(
    ("evolved", "default", "floor_name"), [(0.65, 0.6, "ties (defaults)"), (0.65, 0.5, "x"), (0.5, 0.5, "x")]
)
def test_the_room_is_measured_from_the_better_of_every_default_and_every_source(evolved, default, floor_name):
    c = _comparison(evolved, default)
    v = c.verdict()
    floor = max(default, 0.55)  # the best source, x, averages 0.55; the oracle 0.75
    assert v.floor.name == floor_name and v.floor.mean == pytest.approx(floor)
    assert v.room == pytest.approx(0.75 - floor)
    assert v.room_share == pytest.approx((evolved - floor) / (0.75 - floor))
    assert f"it captures {v.room_share * 100:.0f}%" in statement(v, "acc")


def test_a_default_merge_that_cannot_merge_these_models_is_reported_as_skipped(tiny_zoo, tmp_path):
    """mergekit's multislerp refuses a tensor that three or more models all leave as the base has it (LoRA fine-tunes
    leave most tensors so): the report names that method and why instead of stopping, as the search's portfolio
    does, and scores every other row."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.report import build_report

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    base = load_file(next((zoo / "base").glob("*.safetensors")))
    embed = next(name for name in base if "embed_tokens" in name)
    for name in ("add", "reverse"):
        path = next((zoo / name).glob("*.safetensors"))
        tensors = load_file(path)
        tensors[embed] = base[embed].clone()  # untouched by this fine-tune, as a LoRA adapter leaves it
        save_file(tensors, path, metadata={"format": "pt"})
    shutil.copytree(zoo / "base", zoo / "plain")  # a third model: multislerp falls back to linear for two
    cfg = parse_config(
        {
            "name": "untouched",
            "base_model": str(zoo / "base"),
            "models": [str(zoo / "add"), str(zoo / "reverse"), str(zoo / "plain")],
            "method": "task_arithmetic",
            "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}], "heldout": ["zoo_add"]},
            "budget": {"n_trials": 5},
            "workers": {"count": 0},
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        run_search(cfg, progress=False, log=None, pool_factory=InlinePool)  # its portfolio skips multislerp too
    result = build_report(tmp_path / cfg.run_dir, top_k=1, subset=8, log=None)
    why = result.comparison.skipped["multislerp"]
    assert why.startswith("its default merge failed") and "zero" in why, why
    names = [row.name for row in result.comparison.rows]
    assert "multislerp (defaults)" not in names and "ties (defaults)" in names and "add" in names
    assert "- multislerp: not compared (its default merge failed" in result.report.read_text()
