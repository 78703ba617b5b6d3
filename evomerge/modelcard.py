"""The exported model's card (`README.md`): Hugging Face metadata, scores, caveats and the recipe, written through
`huggingface_hub.ModelCard` so the exported folder can be pushed to the Hub as it is.

    card = model_card(cfg, recipe, trial, objective, validation, comparison)   # README.md text

Metadata: `library_name: transformers`, `tags: [merge, mergekit, evomerge]`, and `base_model` listing every input
that `evomerge export --hub-id LOCAL=org/name` mapped to a Hub id (mergekit's own cards list the merged models
there too). Scores: held-out when `evomerge report` ran before `export` on the same exported trial (with the
source models and the best default merge beside it, and a caveat for every task where the merge is below its
best source by more than noise), else validation and search scores (the caveats then compare the search
scores of the enqueued "only <model>" baselines). The embedded recipe is `recipe.yaml`, less `evomerge.outputs`
(the sha256 of every file in the folder, this card included, which cannot hold its own hash).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.tables import markdown_table

if TYPE_CHECKING:
    from evomerge.config import SearchConfig
    from evomerge.recipe import Recipe
    from evomerge.report.compare import Comparison
    from evomerge.scoring.tasks import TaskSpec

TAGS = ["merge", "mergekit", "evomerge"]
SEARCH_DROP = 0.05  # without held-out data: a search-subset drop of 5 points against a source gets a caveat


def _f(x: float) -> str:
    return f"{x:.4f}"


def metadata(recipe: Recipe, hub_ids: Mapping[str, str], architectures: Sequence[str] = ()) -> dict[str, Any]:
    """The card's YAML front matter: what the Hub indexes (base models, library, tags, pipeline)."""
    data: dict[str, Any] = {"library_name": "transformers", "tags": list(TAGS)}
    published = set(hub_ids.values())
    bases = [m for m in recipe.input_models() if m in published]  # Hub ids only: a local path is no metadata
    if bases:
        data["base_model"] = bases
    if any(a.endswith("ForCausalLM") for a in architectures):
        data["pipeline_tag"] = "text-generation"
    return data


def _scores_table(tasks: Sequence[TaskSpec], scores: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for t in tasks:
        value = scores.get(t.name, {}).get(t.metric)
        rows.append([t.name, t.metric, f"{t.weight:g}", "-" if value is None else _f(value)])
    return markdown_table(["task", "metric", "weight", "score"], rows, align="llrr")


def heldout_section(c: Comparison) -> list[str]:
    """This merge's held-out scores next to the sources' and the best default merge's, and the caveats."""
    from evomerge.report.noise import paired_difference

    v = c.verdict()
    shown = [v.evolved, *c.rows_of("source"), *([v.best_default] if v.best_default else []), v.oracle]
    rows = [
        [("**this merge**" if r is v.evolved else r.name), *(_f(r.scores[t]) for t in c.tasks), _f(r.mean)]
        for r in shown
    ]
    metric = "/".join(sorted(set(c.metrics.values())))
    subset = f"a fixed seeded sample of {c.subset} examples per task" if c.subset else "every example"
    lines = [
        "## Held-out scores",
        "",
        f"`evomerge report` scored this merge, its source models and the default merges on held-out tasks the "
        f"search never saw ({metric}, {subset}); the routing oracle answers each task with its best source model.",
        "",
        *markdown_table(["model", *c.tasks, "mean"], rows, "l" + "r" * (len(c.tasks) + 1)),
        "",
    ]
    if v.vs_default is not None:
        lines += [f"Against the best default merge ({v.best_default.name}): {v.vs_default.text()}.", ""]
    drops = c.drops()
    for task, source, d in drops:
        lines.append(
            f"**Caveat:** on `{task}` this merge scores {_f(v.evolved.scores[task])} against "
            f"{_f(source.scores[task])} for {source.name} alone, {d.points()} ({d.se_text()}): the merge "
            "lost part of that skill; use the source model where that task matters."
        )
    if not drops:
        worst = min(
            (paired_difference(v.evolved, max(c.rows_of("source"), key=lambda r: r.scores[t]), [t]) for t in c.tasks),
            key=lambda d: d.diff,
        )
        lines.append(f"No task is below its best source model by more than noise (the largest gap: {worst.text()}).")
    return lines + [""]


def search_caveats(cfg: SearchConfig, trial, baselines: Sequence) -> list[str]:
    """Without held-out data: the tasks where the trial's search score is below an enqueued "only <model>"
    baseline's (that model alone) by SEARCH_DROP or more."""
    from evomerge.search.record import TrialRecord

    record = TrialRecord.from_trial(trial)
    alone_records = [TrialRecord.from_trial(b) for b in baselines]
    out = []
    for t in cfg.tasks.search:
        alone = [(b.alone, b.task_value(t)) for b in alone_records if b.task_value(t) is not None]
        mine = record.task_value(t)
        if not alone or mine is None:
            continue
        name, best = max(alone, key=lambda x: x[1])
        if best - mine >= SEARCH_DROP:
            n = f"{t.subset} examples" if t.subset else "every example"
            out.append(
                f"**Caveat:** on `{t.name}` (search subset, {n}) this merge scores {_f(mine)} against "
                f"{_f(best)} for {name} alone ({(mine - best) * 100:+.1f} points): the merge lost part of that "
                "skill. `evomerge report` measures it on held-out data."
            )
    return out


def model_card(
    cfg: SearchConfig,
    recipe: Recipe,
    trial,
    objective: float,
    validation=None,
    comparison: Comparison | None = None,
    hub_ids: Mapping[str, str] | None = None,
    baselines: Sequence = (),
    architectures: Sequence[str] = (),
) -> str:
    """README.md of an exported trial. `recipe`: as recipe.yaml holds it, less `evomerge.outputs`; `hub_ids`:
    {local folder: Hub id} of the inputs export renamed; `comparison`: the report's, when it scored this trial;
    `baselines`: the study's COMPLETE "only <model>" trials (for caveats without held-out data)."""
    from huggingface_hub import ModelCard, ModelCardData

    from evomerge import __version__

    hub_ids = dict(hub_ids or {})
    inputs = recipe.input_models()
    merged = [m for m in inputs if m != recipe.base_model]
    into = f" into `{recipe.base_model}`" if recipe.base_model else ""
    lines = [
        f"# {cfg.name}: trial {trial.number}",
        "",
        f"A `{recipe.merge_method}` merge of {', '.join(f'`{m}`' for m in merged)}{into}, found by an evomerge "
        f"{__version__} search (Optuna `{cfg.sampler.name}` sampler, study `{cfg.name}`): every candidate recipe was "
        "merged in memory and scored with lm-eval on fixed seeded subsets of the search tasks.",
        "",
    ]
    from evomerge.search.record import TrialRecord

    record = TrialRecord.from_trial(trial)
    label = record.baseline
    if label:
        lines += [
            f"Trial {trial.number} is the search's enqueued baseline `{label}`, not a sampled recipe: no sampled "
            "recipe scored higher on what picks the exported trial (validation when the config has it, else "
            "the search objective).",
            "",
        ]
    if comparison is not None:
        lines += heldout_section(comparison)
    else:
        lines += [
            "No held-out scores: `evomerge report` had not scored this trial when it was exported (run `evomerge "
            "report RUN_DIR` before `evomerge export RUN_DIR` to put them here).",
            "",
            *search_caveats(cfg, trial, baselines),
            "",
        ]
    if validation is not None:
        lines += [
            "## Validation scores",
            "",
            f"The top {cfg.validation.top_k} trials by search objective and the default merge were re-scored on "
            "validation sets the search never saw; this one scored best there.",
            "",
            *_scores_table(cfg.validation.tasks, validation.scores),
            "",
            f"Validation objective (weighted mean): **{_f(validation.objective)}**",
            "",
        ]
    lines += [
        "## Search scores",
        "",
        "Fixed seeded subsets of the search tasks (never the held-out data); the search optimized them, so they "
        "overstate what the merge does on new examples.",
        "",
        *_scores_table(cfg.tasks.search, record.scores or {}),
        "",
        f"Objective (weighted mean): **{_f(objective)}**",
        "",
        "## Inputs",
        "",
    ]
    digests = recipe.evomerge.inputs if recipe.evomerge is not None else {}
    lines += [f"- `{m}`" + (f" (weights sha256 `{digests[m]}`)" if m in digests else "") for m in inputs]
    local = [m for m in inputs if m not in set(hub_ids.values())]
    if local:
        lines += [
            "",
            "Named by local folder: map each to its Hub id with `evomerge export RUN_DIR --hub-id "
            "LOCAL=org/name` before publishing, so the recipe names models others can download.",
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "evomerge merge recipe.yaml --out OUT       # byte for byte (its kernels; inputs as local folders)",
        "mergekit-yaml recipe.yaml OUT              # same tensors for non-sparsifying methods",
        "evomerge verify .                          # this folder against the sha256 recorded in recipe.yaml",
        "```",
        "",
        "## Recipe",
        "",
        "`recipe.yaml` beside this card, less `evomerge.outputs` (the sha256 of every file in this folder, this card "
        "included, which `evomerge verify` checks):",
        "",
        "```yaml",
        recipe.to_yaml(outputs=False).rstrip(),
        "```",
        "",
    ]
    data = ModelCardData(**metadata(recipe, hub_ids, architectures))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def embedded_recipe(card: str) -> str:
    """The YAML of the card's `## Recipe` block (what tests compare with recipe.yaml)."""
    body = card.split("## Recipe", 1)[1]
    return body.split("```yaml\n", 1)[1].split("\n```", 1)[0] + "\n"


def published_names(cfg: SearchConfig, hub_ids: Mapping[str, str]) -> dict[str, str]:
    """{the recipe's model path: Hub id} from `--hub-id LOCAL=org/name` pairs, each LOCAL one of the study's inputs
    (matched as resolved paths); errors name the flag and the fix."""
    import re

    from evomerge.errors import ConfigError

    inputs = {str(Path(p).resolve()): str(p) for p in [cfg.base_model, *cfg.models]}
    out: dict[str, str] = {}
    for local, hub in hub_ids.items():
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", hub):
            raise ConfigError(f"--hub-id {local}={hub}: {hub!r} is not a Hub id; write it as org/name")
        key = str(Path(local).expanduser().resolve())
        if key not in inputs:
            names = ", ".join(inputs.values())
            raise ConfigError(
                f"--hub-id {local}={hub}: {local} is not an input of study {cfg.name!r} ({names}); "
                "name one of those folders"
            )
        out[inputs[key]] = hub
    return out


__all__ = ["TAGS", "embedded_recipe", "heldout_section", "metadata", "model_card", "published_names", "search_caveats"]
