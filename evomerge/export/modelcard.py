"""The exported model's card (`README.md`): rendered from the template `evomerge/export/templates/modelcard.md` through
`huggingface_hub.ModelCard.from_template` (as mergekit writes its cards from a template), so the exported folder can
be pushed to the Hub as it is.

    card = model_card(cfg, recipe, trial, objective, validation, comparison)   # README.md text

Metadata: `library_name: transformers`, `tags: [merge, mergekit, evomerge]`, `pipeline_tag: text-generation` for a
causal LM, and `base_model` listing every input that `evomerge export --hub-id LOCAL=org/name` mapped to a Hub id
(mergekit's own cards list the merged models there too). Then, in order: what was merged and how it was found; a
note when the exported trial is an enqueued baseline; held-out scores when `evomerge report` ran before `export`
on the same exported trial (with the source models, the best default merge and the routing oracle beside it, and a
caveat for every task where the merge is below its best source by more than noise), else a note and caveats from
the search scores of the enqueued "only <model>" baselines; for an evomerge-only export, its two recipes side by
side (the evomerge-only trial and the best portable one, exported together: which tool reproduces each, their
validation and held-out means, the held-out difference and its paired standard error); the validation scores (with
`validation:`); the search scores and objective; the inputs with their weights' sha256 (and how to name local
folders by Hub ids); the commands that reproduce it (what `mergekit-yaml` gives from it, said as it is:
`portability.mergekit_line`); and the embedded recipe: `recipe.yaml`, less `evomerge.outputs` (the sha256 of every
file in the folder, this card included, which cannot hold its own hash).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.tables import markdown_table

if TYPE_CHECKING:
    from evomerge.config.schema import SearchConfig
    from evomerge.merge.recipe import Recipe
    from evomerge.report.compare import Comparison, Row
    from evomerge.scoring.tasks import TaskSpec

TAGS = ["merge", "mergekit", "evomerge"]
SEARCH_DROP = 0.05  # without held-out data: a search-subset drop of 5 points against a source gets a caveat
PORTABLE_DIR = "portable"  # beside an evomerge-only export: the best portable trial (recipe.yaml, model/)
EVOMERGE_ONLY_DIR = "evomerge-only"  # beside an `export --portable`: the evomerge-only trial it stands in for


@dataclass(frozen=True)
class Pair:
    """An evomerge-only exported trial (`winner`) and the best portable trial, exported together: the main recipe
    in the export folder, the other in its folder `folder` (`swapped`, i.e. `export --portable`: the portable one
    is the main recipe). `validations`: {trial: its validation objective} where the guard scored it."""

    winner: Any
    portable: Any
    swapped: bool = False
    validations: dict[int, float] = field(default_factory=dict)

    @property
    def main(self) -> Any:
        return self.portable if self.swapped else self.winner

    @property
    def beside(self) -> Any:
        return self.winner if self.swapped else self.portable

    @property
    def folder(self) -> str:
        """The folder of the export that holds `beside` (recipe.yaml, model/)."""
        return EVOMERGE_ONLY_DIR if self.swapped else PORTABLE_DIR

    def where(self, trial) -> str:
        """Where `trial`'s recipe lies, relative to the export folder."""
        return f"`{self.folder}/recipe.yaml`" if trial.number == self.beside.number else "`recipe.yaml`"


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


def this_row(c: Comparison, pair: Pair | None, trial) -> Row | None:
    """The comparison's row of `trial`: the evolved row (the exported trial), or the portable row when it is the
    pair's portable trial; None when the report scored neither as such."""
    if trial.number == c.best_trial:
        return c.rows_of("evolved")[0]
    if pair is not None and trial.number == pair.portable.number and c.portable_trial == trial.number:
        return c.rows_of("portable")[0]
    return None


def heldout_section(c: Comparison, this: Row | None = None) -> list[str]:
    """This merge's held-out scores (`this`, default: the evolved row) next to the sources' and the best default
    merge's, and the caveats."""
    from evomerge.report.noise import paired_difference

    v = c.verdict()
    this = this or v.evolved
    shown = [this, *c.rows_of("source"), *([v.best_default] if v.best_default else []), v.oracle]
    rows = [
        [("**this merge**" if r is this else r.name), *(_f(r.scores[t]) for t in c.tasks), _f(r.mean)] for r in shown
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
    if v.best_default is not None:
        vs_default = paired_difference(this, v.best_default, c.tasks)
        lines += [f"Against the best default merge ({v.best_default.name}): {vs_default.text()}.", ""]
    drops = c.drops(this)
    for task, source, d in drops:
        lines.append(
            f"**Caveat:** on `{task}` this merge scores {_f(this.scores[task])} against "
            f"{_f(source.scores[task])} for {source.name} alone, {d.points()} ({d.se_text()}): the merge "
            "lost part of that skill; use the source model where that task matters."
        )
    if not drops:
        worst = min(
            (paired_difference(this, max(c.rows_of("source"), key=lambda r: r.scores[t]), [t]) for t in c.tasks),
            key=lambda d: d.diff,
        )
        lines.append(f"No task is below its best source model by more than noise (the largest gap: {worst.text()}).")
    return lines + [""]


def pair_section(pair: Pair, trial, c: Comparison | None) -> list[str]:
    """The two recipes of an evomerge-only export side by side: which tool reproduces each, where each lies, their
    validation and held-out scores, and the held-out difference with its paired standard error."""
    from evomerge.merge.portability import exact, why_not_portable
    from evomerge.merge.recipe import Recipe
    from evomerge.report.noise import paired_difference
    from evomerge.study.record import TrialRecord

    mine = "portable" if trial.number == pair.portable.number else "evomerge-only"
    portable_recipe = Recipe.from_yaml(TrialRecord.from_trial(pair.portable).recipe or "")
    why = why_not_portable(Recipe.from_yaml(TrialRecord.from_trial(pair.winner).recipe or ""))
    mergekit = "the same tensors" if exact(portable_recipe) else "the same model up to magnitude ties and random masks"
    rows_of = {}
    if c is not None and c.best_trial == pair.winner.number and c.portable_trial == pair.portable.number:
        rows_of = {pair.winner.number: c.rows_of("evolved")[0], pair.portable.number: c.rows_of("portable")[0]}
    table = []
    for t, kind, tools in [
        (pair.winner, "evomerge-only", "`evomerge merge` only"),
        (pair.portable, "portable", f"`evomerge merge`; `mergekit-yaml` ({mergekit})"),
    ]:
        name = f"**{kind} (this one)**" if kind == mine else kind
        valid = pair.validations.get(t.number)
        held = rows_of[t.number].mean if rows_of else None
        table.append(
            [
                name,
                str(t.number),
                pair.where(t),
                tools,
                "-" if valid is None else _f(valid),
                "-" if held is None else _f(held),
            ]
        )
    lines = [
        "## Evomerge-only and portable recipes",
        "",
        f"The search's pick, trial {pair.winner.number}, is evomerge-only: `evomerge merge` reproduces it, "
        f"`mergekit-yaml` would merge another model ({why}). The "
        f"best trial that `mergekit-yaml` reproduces, trial {pair.portable.number}, was exported with it, chosen as "
        "the pick is (validation when the config has it, else the search objective). Paths are relative to the "
        "export folder.",
        "",
        *markdown_table(
            ["recipe", "trial", "file", "reproduced by", "validation objective", "held-out mean"], table, "lrllrr"
        ),
        "",
    ]
    if rows_of:
        d = paired_difference(rows_of[pair.winner.number], rows_of[pair.portable.number], c.tasks)
        lines.append(f"Held-out, evomerge-only minus portable: {d.text()}.")
    else:
        lines.append("No held-out scores of the pair: run `evomerge report RUN_DIR`, then export again.")
    return lines + [""]


def search_caveats(cfg: SearchConfig, trial, baselines: Sequence) -> list[str]:
    """Without held-out data: the tasks where the trial's search score is below an enqueued "only <model>"
    baseline's (that model alone) by SEARCH_DROP or more."""
    from evomerge.study.record import TrialRecord

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
    pair: Pair | None = None,
) -> str:
    """README.md of an exported trial, rendered from `templates/modelcard.md`. `recipe`: as recipe.yaml holds it,
    less `evomerge.outputs`; `hub_ids`: {local folder: Hub id} of the inputs export renamed; `comparison`: the
    report's, when it scored this trial; `baselines`: the study's COMPLETE "only <model>" trials (for caveats without
    held-out data); `pair`: the evomerge-only and portable trials exported together, `trial` one of them."""
    from huggingface_hub import ModelCard, ModelCardData

    from evomerge.resources import TEMPLATES

    data = ModelCardData(**metadata(recipe, hub_ids or {}, architectures))
    fields = _card_fields(cfg, recipe, trial, objective, validation, comparison, hub_ids or {}, baselines, pair)
    return str(ModelCard.from_template(data, template_path=str(TEMPLATES / "modelcard.md"), **fields))


def _card_fields(cfg, recipe, trial, objective, validation, comparison, hub_ids, baselines, pair) -> dict[str, Any]:
    """What the template fills in: the merge, its scores (held-out, or search caveats), validation, inputs, and
    what `mergekit-yaml` gives from its recipe."""
    from evomerge import __version__
    from evomerge.merge.portability import mergekit_line
    from evomerge.study.record import TrialRecord

    record = TrialRecord.from_trial(trial)
    inputs = recipe.input_models()
    digests = recipe.evomerge.inputs if recipe.evomerge is not None else {}
    row = this_row(comparison, pair, trial) if comparison is not None else None
    caveats = search_caveats(cfg, trial, baselines) if row is None else []
    return {
        "study": cfg.name,
        "trial": trial.number,
        "method": recipe.merge_method,
        "merged": ", ".join(f"`{m}`" for m in inputs if m != recipe.base_model),
        "into": f" into `{recipe.base_model}`" if recipe.base_model else "",
        "version": __version__,
        "sampler": cfg.sampler.name,
        "baseline": record.baseline,
        "heldout": "\n".join(heldout_section(comparison, row)) if row is not None else "",
        "pair": "\n".join(pair_section(pair, trial, comparison)) if pair is not None else "",
        "portable_pick": pair is not None and trial.number == pair.portable.number,  # not the best of all
        "mergekit": mergekit_line(recipe),
        "caveats": "\n".join(caveats) + "\n" if caveats else "",
        "validation": _validation_fields(cfg, validation),
        "search_table": "\n".join(_scores_table(cfg.tasks.search, record.scores or {})),
        "objective": _f(objective),
        "inputs": "\n".join(f"- `{m}`" + (f" (weights sha256 `{digests[m]}`)" if m in digests else "") for m in inputs),
        "local": any(m not in set(hub_ids.values()) for m in inputs),
        "recipe": recipe.to_yaml(outputs=False).rstrip(),
    }


def _validation_fields(cfg: SearchConfig, validation) -> dict[str, Any] | None:
    if validation is None:
        return None
    table = "\n".join(_scores_table(cfg.validation.tasks, validation.scores))
    return {"top_k": cfg.validation.top_k, "table": table, "objective": _f(validation.objective)}


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


__all__ = [
    "EVOMERGE_ONLY_DIR",
    "PORTABLE_DIR",
    "TAGS",
    "Pair",
    "embedded_recipe",
    "heldout_section",
    "metadata",
    "model_card",
    "pair_section",
    "published_names",
    "search_caveats",
    "this_row",
]
