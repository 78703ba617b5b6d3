"""Functional interference probe (`evomerge audit CONFIG.yaml --probe`): where do the models' skills collide?

    from evomerge.analysis.probe import probe, format_probe, probe_summary
    report = probe("zoo/base", ["zoo/add", "zoo/reverse"], [TaskSpec(name="zoo_add_search"), ...])

Weight statistics (sign conflict, cosine) say where task vectors differ, not where one model's change breaks
another model's skill; on the demo zoo they point at layers 2 and 5 while the damage is in layers 0-1. This
probe measures the damage. Each task belongs to the source model that scores best on it (the routing
oracle's choice). For each region r of the network (each layer, all attention, all MLP, embeddings, head)
and each task t owned by model m:
- need: how many points t loses when m's own task vector is removed in r;
- harm: how many points t loses when the other models' task vectors are added to m in r only.
Every probe is a real task-arithmetic recipe with `filter:` weights (mergekit's substring filters), merged in
memory by the candidate evaluator (`evomerge.candidate.evaluator`) and scored on the tasks; a model alone is
`evaluator.alone` (its exact weights), and the controls' weights are loaded into the same evaluator. A region is a
*conflict* when some task is harmed
there by a model that needs the region itself: a recipe can only trade the two skills there. It is
*routable* when the harm comes from models that do not need the region: a per-layer search can drop their
vectors there. Two controls tell a specific collision from mere size: the other models' vectors shuffled
within each tensor, and Gaussian noise with their per-tensor norms, each added to m everywhere.

The verdicts take one region at a time; regions can be redundant (each safe to drop alone, not all at
once), so the probe also scores the routable regions dropped together. Cost: 2 scorer calls per
task-owning model and region, plus one per model and control (about 30 s on the demo zoo with 100
examples per task, 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.tables import text_table

if TYPE_CHECKING:
    import torch

    from evomerge.merge.layout import Layout

NEED, HARM = 10.0, 5.0  # points: a model "needs" a region / a vector "hurts" a task there


@dataclass
class RegionProbe:
    region: str
    filter: str  # the mergekit filter that selects the region's tensors
    need: dict[str, float]  # task -> points lost without its owner's vector in the region
    harm: dict[str, float]  # task -> points lost with the other models' vectors added in the region
    verdict: str  # conflict | routable | quiet


@dataclass
class ProbeReport:
    models: list[str]
    owners: dict[str, str]  # task -> the model that scores best on it
    alone: dict[str, float]  # task -> its owner's score (points)
    all_in: dict[str, float]  # task -> score with every task vector at weight 1
    controls: dict[str, dict[str, float]]  # task -> {"shuffled" | "noise": points lost}
    regions: list[RegionProbe] = field(default_factory=list)
    unowned: list[str] = field(default_factory=list)  # tasks no model does better on than the base
    # the routable regions checked together: each model's vector dropped in the routable regions where it hurts
    # another model's task, every other weight 1 (regions can be redundant: each fine alone, not all at once)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # model -> regions where its vector was dropped
    joint: dict[str, float] = field(default_factory=dict)  # task -> score with those drops

    def to_dict(self) -> dict:
        return asdict(self)


def regions_of(num_layers: int, layout: Layout | None = None) -> list[tuple[str, str]]:
    """(label, filter) of every probed region, in the names of `layout`'s architecture (default: Llama's)."""
    if layout is None:
        layers = [(f"layer {i}", f"layers.{i}.") for i in range(num_layers)]
        return layers + [
            ("attention", "self_attn"),
            ("MLP", "mlp"),
            ("embeddings", "embed_tokens"),
            ("head", "lm_head"),
        ]
    from evomerge.merge.layout import HEAD_PARTS

    out = [(f"layer {i}", layout.layer_filter(i)) for i in range(num_layers)]
    out += [
        (label, flt)
        for label, flt in (("attention", layout.kind_filter("self_attn")), ("MLP", layout.kind_filter("mlp")))
        if flt
    ]
    embeds = layout.embedding_filters()  # a tied head is no region of its own
    out += [
        (label, found[0])
        for label, found in (
            ("embeddings", [f for f in embeds if f not in HEAD_PARTS]),
            ("head", [f for f in embeds if f in HEAD_PARTS]),
        )
        if found
    ]
    return out


def verdict(region: RegionProbe, owners: dict[str, str]) -> str:
    """conflict: a task is harmed by a model that needs the region; routable: harmed only by models that don't."""
    harmed = [t for t, h in region.harm.items() if h >= HARM]
    if not harmed:
        return "quiet"
    for t in harmed:
        others = [u for u in region.need if owners[u] != owners[t]]
        if any(region.need[u] >= NEED for u in others):
            return "conflict"
    return "routable"


def probe(
    base: str | Path,
    models: Sequence[str | Path],
    tasks: Sequence,
    include_paths: Sequence[str | Path] = (),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    include_defaults: bool = False,
    allow_config_mismatch: bool = False,
    tokenizer_source: str | None = None,
) -> ProbeReport:
    """Score the probes (see the module docstring); `tasks` are TaskSpecs (or names) with their metric."""
    from evomerge.candidate.evaluator import Evaluator

    base = str(base)
    paths = [str(m) for m in models if Path(m).resolve() != Path(base).resolve()]
    ev = Evaluator(
        paths,
        base,
        {"probe": list(tasks)},
        include_paths,
        seed=seed,
        include_defaults=include_defaults,
        allow_config_mismatch=allow_config_mismatch,
        tokenizer_source=tokenizer_source,
    )
    prober = _Prober(ev, base, paths, seed, log or (lambda _msg: None))
    report = prober.owners()
    prober.controls(report)
    prober.regions(report)
    report.dropped = routable_drops(report)
    if report.dropped:
        report.joint = {t: v for t, v in prober.task_arithmetic(drop_weights(report)).items() if t in report.owners}
    return report


class _Prober:
    """The probe's merges, each scored on the probe tasks (in points): models alone, task arithmetic with `filter:`
    weights, and the controls."""

    def __init__(self, ev, base: str, paths: list[str], seed: int, log: Callable[[str], None]):
        from evomerge.candidate.space import model_keys

        self.ev, self.base, self.paths, self.seed, self.log = ev, base, paths, seed, log
        self.keys = model_keys(paths)
        self.owned: dict[int, list[str]] = {}  # model index -> the tasks it owns

    def score(self) -> dict[str, float]:
        return {t: 100.0 * v for t, v in self.ev.score("probe").units.items()}

    def task_arithmetic(self, weights: list) -> dict[str, float]:
        from evomerge.merge.recipe import ModelEntry, Recipe

        entries = [ModelEntry(model=m, parameters={"weight": w}) for m, w in zip(self.paths, weights)]
        self.ev.load(Recipe(merge_method="task_arithmetic", base_model=self.base, models=entries))
        return self.score()

    def exactly(self, path: str) -> dict[str, float]:
        self.ev.load_model(path)  # `evaluator.alone`: its exact weights
        return self.score()

    def owners(self) -> ProbeReport:
        """Each task's owner: the source model best on it, where that beats the base (else the task is unowned)."""
        base_scores = self.exactly(self.base)
        alone_scores = {}
        for key, path in zip(self.keys, self.paths):
            alone_scores[key] = self.exactly(path)
            self.log(f"probe: {key} alone")
        owners, unowned = {}, []
        for t in base_scores:
            best = max(self.keys, key=lambda k: alone_scores[k][t])
            if alone_scores[best][t] > base_scores[t]:
                owners[t] = best
            else:
                unowned.append(t)
        self.owned = {i: [t for t in owners if owners[t] == k] for i, k in enumerate(self.keys) if k in owners.values()}
        return ProbeReport(
            models=self.keys,
            owners=owners,
            alone={t: alone_scores[owners[t]][t] for t in owners},
            all_in={t: v for t, v in self.task_arithmetic([1.0] * len(self.paths)).items() if t in owners},
            controls={t: {} for t in owners},
            unowned=unowned,
        )

    def controls(self, report: ProbeReport) -> None:
        """Each owner plus the other vectors shuffled within each tensor, and as noise of the same norms."""
        for i, mine in self.owned.items():
            for kind in ("shuffled", "noise"):
                self.ev.load_weights(control_weights(self.ev.checkpoints, len(self.keys), i, kind, self.seed))
                after = self.score()
                for t in mine:
                    report.controls[t][kind] = report.alone[t] - after[t]

    def regions(self, report: ProbeReport) -> None:
        """Per region: what each owner loses without its own vector there (`-own`) and with the others' there only
        (`+others`), and the region's verdict."""
        layout = self.ev.materializer.layout
        n = len(self.paths)
        for label, flt in regions_of(layout.num_layers, layout):
            inside = [{"filter": flt, "value": 1.0}, {"value": 0.0}]  # weight 1 in the region only
            outside = [{"filter": flt, "value": 0.0}, {"value": 1.0}]  # weight 1 everywhere but the region
            need, harm = {}, {}
            for i, mine in self.owned.items():
                lost = self.task_arithmetic([outside if j == i else 0.0 for j in range(n)])
                hurt = self.task_arithmetic([1.0 if j == i else inside for j in range(n)])
                for t in mine:
                    need[t] = report.alone[t] - lost[t]
                    harm[t] = report.alone[t] - hurt[t]
            region = RegionProbe(region=label, filter=flt, need=need, harm=harm, verdict="")
            region.verdict = verdict(region, report.owners)
            report.regions.append(region)
            self.log(f"probe: {label}: {region.verdict}")


def routable_drops(report: ProbeReport) -> dict[str, list[str]]:
    """model -> the routable regions where a task another model owns is harmed (so this model's vector may go)."""
    out: dict[str, list[str]] = {}
    for key in report.models:
        regions = [
            r.region
            for r in report.regions
            if r.verdict == "routable" and any(h >= HARM and report.owners[t] != key for t, h in r.harm.items())
        ]
        if regions:
            out[key] = regions
    return out


def drop_weights(report: ProbeReport) -> list:
    """Per model (in order): weight 0 in its dropped regions, 1 elsewhere (mergekit conditional parameters)."""
    filters = {r.region: r.filter for r in report.regions}
    weights: list = []
    for key in report.models:
        drops = [{"filter": filters[r], "value": 0.0} for r in report.dropped.get(key, [])]
        weights.append(drops + [{"value": 1.0}] if drops else 1.0)
    return weights


def control_weights(checkpoints: Sequence, n_models: int, i: int, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Model i's weights plus, in place of each other model's task vector, an unrelated change of the same size:
    that vector shuffled within each tensor, or Gaussian noise with its norm. `checkpoints`: the models in
    order, then the base (an evaluator's `checkpoints`)."""
    import torch

    from evomerge.merge.materialize import tensor_seed

    models, base = checkpoints[:n_models], checkpoints[n_models]
    out = {}
    for name in base.tensor_names():
        b = base.get(name).float()
        tensor = models[i].get(name).float().clone()
        for j, other in enumerate(models):
            if j == i:
                continue
            delta = other.get(name).float() - b
            g = torch.Generator().manual_seed(tensor_seed(seed + j, name))
            if kind == "shuffled":
                tensor += delta.flatten()[torch.randperm(delta.numel(), generator=g)].view_as(delta)
            else:
                noise = torch.randn(delta.shape, generator=g)
                tensor += noise * (delta.norm() / noise.norm().clamp_min(1e-12))
        out[name] = tensor
    return out


def format_probe(report: ProbeReport) -> str:
    """The probe as text: owners and controls, then one row per region (points lost) and its verdict."""
    tasks = list(report.owners)
    lines = [
        "functional probe: each task's score against its owner alone, in points, every cell a merged recipe "
        "(-own: the owner without its own task vector in the region; +others: the owner plus the other "
        "models' task vectors in the region only)"
    ]
    for t in tasks:
        c = report.controls[t]
        lines.append(
            f"  {t}: owner {report.owners[t]} ({report.alone[t]:.1f}); all task vectors at weight 1: "
            f"{report.all_in[t]:.1f}; plus the others' vectors shuffled: {_pts(-c['shuffled'])}, "
            f"as noise: {_pts(-c['noise'])}"
        )
    for t in report.unowned:
        lines.append(f"  {t}: no model beats the base on it; not probed")
    head = ["region"] + [f"{t} {col}" for t in tasks for col in ("-own", "+others")] + ["verdict"]
    rows = [
        [r.region] + [_pts(-v) for t in tasks for v in (r.need[t], r.harm[t])] + [r.verdict] for r in report.regions
    ]
    lines += ["", text_table(head, rows, "l" + "r" * (len(head) - 2) + "l")]
    return "\n".join(lines)


def _pts(x: float) -> str:
    """Points with a sign, never '-0.0'."""
    return f"{0.0 if round(x, 1) == 0 else x:+.1f}"


def probe_summary(report: ProbeReport) -> list[str]:
    """Plain-language lines: where the skills conflict, where a per-layer search can route, whether the harm is
    specific."""
    if not report.owners:
        return ["Probe: no model beats the base on any task, so no task has an owner to probe; check the tasks."]
    by = {v: [r.region for r in report.regions if r.verdict == v] for v in ("conflict", "routable", "quiet")}
    lines = []
    if by["conflict"]:
        lines.append(
            f"Probe: the skills conflict in {', '.join(by['conflict'])}: a model needs its change there "
            f"(>= {NEED:.0f} points) and that change costs another model's task >= {HARM:.0f} points; "
            "a recipe can only trade the two skills there."
        )
    if by["routable"]:
        lines.append(
            f"Probe: routable, one region at a time: {', '.join(by['routable'])}: a model's change there hurts "
            "another's task and its own task does not need it there (taken alone)."
        )
    if not by["conflict"] and not by["routable"]:
        lines.append("Probe: no region hurts another model's task: a plain sum of the task vectors keeps the skills.")
    if report.joint:
        drops = "; ".join(f"{k} in {', '.join(rs)}" for k, rs in report.dropped.items())
        scores = ", ".join(f"{t} {report.all_in[t]:.1f} -> {report.joint[t]:.1f}" for t in report.joint)
        costs = {t: report.all_in[t] - report.joint[t] for t in report.joint}
        hurt = [t for t, c in costs.items() if c >= HARM]
        head = (
            f"Probe: the routable regions dropped together (dropping {drops}; every other task vector at weight 1): "
            f"{scores} (against all task vectors at weight 1)"
        )
        if hurt:
            lost = ", ".join(f"{t} {costs[t]:.1f} points" for t in hurt)
            lines.append(
                f"{head}: that costs {lost}, so they are not free to drop: each region can go alone but not "
                "all of them (they are redundant); weight them down one at a time, or leave it to the "
                "search."
            )
        else:
            lines.append(
                f"{head}: every skill keeps its score, so a per-layer search can give those regions a low weight."
            )
    lost = {t: report.alone[t] - report.all_in[t] for t in report.owners}
    specific = [t for t in report.owners if lost[t] >= max(HARM, 2 * max(report.controls[t].values(), default=0.0))]
    if specific:
        lines.append(
            f"Probe: on {', '.join(specific)} the other task vectors cost far more than unrelated changes of "
            "the same size: the collision is between the skills, not the size of the change."
        )
    return lines


__all__ = [
    "HARM",
    "NEED",
    "ProbeReport",
    "RegionProbe",
    "drop_weights",
    "format_probe",
    "probe",
    "probe_summary",
    "regions_of",
    "routable_drops",
    "verdict",
]
