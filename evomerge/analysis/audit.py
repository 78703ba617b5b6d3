"""Task-vector statistics: how far fine-tunes agree, per layer and tensor kind, before any merge is tried.

    evomerge audit zoo/search.yaml --plot audit.png

For every tensor the task vectors (model - base) are compared pairwise: cosine similarity, Spearman
rank correlation on a fixed seeded sample of positions, and the sign-conflict rate (of the positions
where both deltas are non-zero, the fraction where they point opposite ways). Each model's delta size
is reported relative to the base (||delta|| / ||base||). Statistics are pooled per row (embed, each
layer, final norm, lm_head) and per kind (self_attn, mlp, all); with more than two models the pairwise
figures are averaged over pairs. Tensors come through `Checkpoint.get` (memory-mapped); nothing is written.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.layout import LAYER_RE
from evomerge.tables import text_table

if TYPE_CHECKING:
    import torch

KINDS = ("self_attn", "mlp", "all")
SAMPLE = 100_000


class TensorSource(Protocol):
    """What the audit reads from a checkpoint (`evomerge.io.checkpoint.Checkpoint` satisfies it)."""

    def tensor_names(self) -> Sequence[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def tensor_group(name: str) -> tuple[str, str]:
    """(row, kind) of a tensor name: row is 'embed', 'layer N', 'norm', 'lm_head' or the name's stem;
    kind is 'self_attn', 'mlp' or 'other' (layer norms and everything outside the layers)."""
    m = LAYER_RE.search(name)
    if m:
        rest = name[m.end() :]
        if "norm" in rest or rest.startswith("ln_"):
            kind = "other"
        elif "attn" in rest or "attention" in rest:
            kind = "self_attn"
        elif "mlp" in rest or "feed_forward" in rest or "ffn" in rest:
            kind = "mlp"
        else:
            kind = "other"
        return f"layer {int(m.group(1))}", kind
    if "lm_head" in name or "embed_out" in name or name.startswith("output."):  # GPT-NeoX's head is embed_out
        return "lm_head", "other"
    if "embed" in name or "wte" in name or "wpe" in name:
        return "embed", "other"
    if "norm" in name or name.endswith("ln_f.weight") or name.endswith("ln_f.bias"):
        return "norm", "other"
    return name.rsplit(".", 1)[0], "other"


def _row_order(row: str) -> tuple[int, int, str]:
    if row == "embed":
        return (0, 0, row)
    if row.startswith("layer "):
        return (1, int(row.split()[1]), row)
    if row == "norm":
        return (2, 0, row)
    if row == "lm_head":
        return (3, 0, row)
    return (4, 0, row)


class GroupStats(BaseModel):
    """Pooled statistics of the tensors of one row and kind. None where undefined (e.g. zero deltas)."""

    model_config = ConfigDict(frozen=True)

    row: str
    kind: str
    n_params: int
    cosine: float | None
    spearman: float | None
    conflict: float | None
    magnitude: float | None  # mean over models of ||delta|| / ||base||
    magnitude_per_model: list[float | None]


class AuditReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    base: str
    models: list[str]
    n_tensors: int
    n_params: int
    sample: int
    seed: int
    groups: list[GroupStats]
    vocabulary: list[str] = []  # one line per model whose vocabulary differs from the base's (added tokens)

    def rows(self) -> list[str]:
        """Row names in model order (embed, layer 0..N-1, norm, lm_head)."""
        return sorted({g.row for g in self.groups}, key=_row_order)

    def get(self, row: str, kind: str = "all") -> GroupStats | None:
        return next((g for g in self.groups if g.row == row and g.kind == kind), None)

    def layer_rows(self) -> list[GroupStats]:
        return [g for g in self.groups if g.kind == "all" and g.row.startswith("layer ")]


@dataclass
class _Pool:
    """Running sums of one (row, kind): enough to pool the statistics exactly over its tensors."""

    n_models: int
    n_params: int = 0
    base_sq: float = 0.0
    delta_sq: list[float] = field(default_factory=list)
    dot: dict[tuple[int, int], float] = field(default_factory=dict)
    both: dict[tuple[int, int], int] = field(default_factory=dict)
    opposite: dict[tuple[int, int], int] = field(default_factory=dict)
    samples: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.delta_sq = [0.0] * self.n_models
        self.samples = [[] for _ in range(self.n_models)]
        for p in itertools.combinations(range(self.n_models), 2):
            self.dot[p], self.both[p], self.opposite[p] = 0.0, 0, 0


def sample_positions(name: str, numel: int, sample: int, seed: int) -> torch.Tensor | None:
    """A fixed set of flat positions for the Spearman sample of one tensor: None means 'all of them'.
    Seeded from (seed, tensor name), so it does not depend on tensor order."""
    import torch

    if numel <= sample:
        return None
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.randint(0, numel, (sample,), generator=gen)


def _accumulate(pools: list[_Pool], base: torch.Tensor, deltas: list[torch.Tensor], idx) -> None:
    import torch

    # float32 BLAS dots (one pass each) and int8 signs keep a 0.5B-parameter audit to a few passes per tensor
    flat = [d.reshape(-1) for d in deltas]
    b = base.reshape(-1)
    base_sq = float(torch.dot(b, b)) if b.numel() else 0.0
    sq = [float(torch.dot(d, d)) for d in flat]
    signs = [torch.sign(d).to(torch.int8) for d in flat]
    pair_stats = {}
    for i, j in itertools.combinations(range(len(deltas)), 2):
        prod = signs[i] * signs[j]  # +1 agree, -1 opposite, 0 where either delta is zero
        both = int(torch.count_nonzero(prod))
        agree_minus_opposite = int(prod.sum())
        pair_stats[(i, j)] = (float(torch.dot(flat[i], flat[j])), both, (both - agree_minus_opposite) // 2)
    picked = [d.reshape(-1) if idx is None else d.reshape(-1)[idx] for d in deltas]
    for pool in pools:
        pool.n_params += base.numel()
        pool.base_sq += base_sq
        for m in range(len(deltas)):
            pool.delta_sq[m] += sq[m]
            pool.samples[m].append(picked[m])
        for p, (dot, both, opp) in pair_stats.items():
            pool.dot[p] += dot
            pool.both[p] += both
            pool.opposite[p] += opp


def _spearman(a, b) -> float | None:
    """Spearman rank correlation; None where it is undefined (a constant sample, e.g. an all-zero delta)."""
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # a constant input warns and gives NaN: that is the None case
        warnings.simplefilter("ignore")
        rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _finish(row: str, kind: str, pool: _Pool) -> GroupStats:
    import torch

    cos, spear, conf = [], [], []
    cat = [torch.cat(s).float().numpy() for s in pool.samples]
    for i, j in pool.dot:
        denom = math.sqrt(pool.delta_sq[i] * pool.delta_sq[j])
        cos.append(pool.dot[(i, j)] / denom if denom > 0 else None)
        spear.append(_spearman(cat[i], cat[j]))
        conf.append(pool.opposite[(i, j)] / pool.both[(i, j)] if pool.both[(i, j)] else None)
    mags = [math.sqrt(sq / pool.base_sq) if pool.base_sq > 0 else None for sq in pool.delta_sq]
    return GroupStats(
        row=row,
        kind=kind,
        n_params=pool.n_params,
        cosine=_mean(cos),
        spearman=_mean(spear),
        conflict=_mean(conf),
        magnitude=_mean(mags),
        magnitude_per_model=mags,
    )


def audit(
    base: TensorSource,
    models: Sequence[TensorSource],
    labels: tuple[str, Sequence[str]] | None = None,
    sample: int = SAMPLE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> AuditReport:
    """Task-vector statistics of `models` against `base`. Call `check_compatible` first: this assumes
    the checkpoints share tensor names and shapes. `labels` = (base label, model labels) for the report."""
    import torch

    if len(models) < 2:
        raise ConfigError(f"audit needs at least two models besides the base, got {len(models)}")
    names = list(base.tensor_names())
    pools: dict[tuple[str, str], _Pool] = {}
    with torch.no_grad():
        for k, name in enumerate(names):
            row, kind = tensor_group(name)
            keys = [(row, "all")] + ([(row, kind)] if kind in KINDS else [])
            targets = [pools.setdefault(key, _Pool(len(models))) for key in keys]
            b = base.get(name).float()
            deltas = [m.get(name).float() - b for m in models]
            _accumulate(targets, b, deltas, sample_positions(name, b.numel(), sample, seed))
            if progress:
                progress(k + 1, len(names))
    groups = [_finish(row, kind, pool) for (row, kind), pool in pools.items()]
    groups.sort(key=lambda g: (_row_order(g.row), KINDS.index(g.kind)))
    base_label, model_labels = labels or ("base", [f"model{i}" for i in range(len(models))])
    return AuditReport(
        base=base_label,
        models=list(model_labels),
        n_tensors=len(names),
        n_params=sum(p.n_params for (_, kind), p in pools.items() if kind == "all"),
        sample=sample,
        seed=seed,
        groups=groups,
    )


def interference_layers(report: AuditReport, top: int | None = None) -> list[GroupStats]:
    """The layers where the task vectors fight most: highest sign conflict, then lowest cosine."""
    layers = [g for g in report.layer_rows() if g.conflict is not None or g.cosine is not None]
    layers.sort(key=lambda g: (-(g.conflict or 0.0), g.cosine if g.cosine is not None else 1.0))
    n = top if top is not None else max(1, math.ceil(len(layers) / 4))
    return layers[:n]


def summary(report: AuditReport) -> list[str]:
    """A few plain-language lines: overall similarity, where interference concentrates, who is louder."""
    layers = report.layer_rows()
    lines: list[str] = []
    cos = _mean([g.cosine for g in layers])
    conf = _mean([g.conflict for g in layers])
    if cos is None:
        return ["The task vectors are zero: the models are identical to the base, nothing to merge."]
    if cos > 0.5:
        verdict = "strongly aligned: a merge is dominated by the louder model and adds little"
    elif cos < -0.2:
        verdict = "opposed: the models undo each other's changes, expect heavy interference"
    else:
        verdict = "weakly correlated: the usual regime in which merging keeps both skills"
    lines.append(
        f"Task vectors are {verdict} (mean cosine over layers {cos:+.2f}"
        + (f", sign conflict {conf:.2f})." if conf is not None else ").")
    )
    worst = interference_layers(report)
    known_conf = [g.conflict for g in layers if g.conflict is not None]
    if conf is not None and conf > 0 and worst:
        low, high = min(known_conf), max(known_conf)
        if high - low < 0.02:
            lines.append(
                f"Sign conflict is nearly uniform across layers ({low:.2f}-{high:.2f}): no layer stands out, "
                "so one global density/weight loses little."
            )
        else:
            parts = []
            for g in worst:
                kinds = [report.get(g.row, k) for k in ("self_attn", "mlp")]
                kinds = [k for k in kinds if k is not None and k.conflict is not None]
                hot = f", mostly {max(kinds, key=lambda k: k.conflict).kind}" if kinds else ""
                cos_txt = f", cosine {g.cosine:+.2f}" if g.cosine is not None else ""
                parts.append(f"{g.row.removeprefix('layer ')} (conflict {g.conflict:.2f}{cos_txt}{hot})")
            label = "layer" if len(parts) == 1 else "layers"
            lines.append(
                f"Interference concentrates in {label} {', '.join(parts)}, against a layer mean of "
                f"{conf:.2f} (range {low:.2f}-{high:.2f}): a per-layer search should give "
                f"{'it its' if len(parts) == 1 else 'these layers their'} own density and weight."
            )
        if 0.4 <= conf <= 0.6:
            lines.append(
                "Sign-conflict rates near 0.5 are what unrelated task vectors give, so they locate "
                "interference only weakly; `evomerge audit CONFIG.yaml --probe` measures where one "
                "model's change hurts another model's task."
            )
    elif conf == 0:
        lines.append("No sign conflict anywhere: the deltas agree in sign wherever both are non-zero.")
    mags = [_mean([g.magnitude_per_model[m] for g in layers]) for m in range(len(report.models))]
    known = [(m, v) for m, v in zip(report.models, mags) if v]
    if len(known) >= 2:
        loud, quiet = max(known, key=lambda x: x[1]), min(known, key=lambda x: x[1])
        if loud[1] > 2 * quiet[1]:
            lines.append(
                f"{loud[0]} moved {loud[1] / quiet[1]:.1f}x further from the base than {quiet[0]} "
                f"(||delta||/||base|| {loud[1]:.3g} vs {quiet[1]:.3g}): weight it down or it dominates."
            )
    return lines


def load_inputs(path: Path | str) -> tuple[Path, list[Path]]:
    """(base, models) of a recipe YAML (has `merge_method`) or a search config (`base_model`, `models`).
    Relative paths resolve from the YAML's folder; a missing directory is a ModelError naming the field."""
    from evomerge.io.yamlfile import read_yaml

    path = Path(path)
    raw = read_yaml(path, "file (pass a recipe or search config YAML)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `base_model` and `models`, or a mergekit recipe")
    if "merge_method" in raw:
        return _recipe_inputs(path)
    if "base_model" not in raw:
        raise ConfigError(f"{path}: field `base_model` is missing; audit measures task vectors against it")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: field `models` must be a non-empty list of model paths")
    fields = [("base_model", raw["base_model"])]
    for i, m in enumerate(models):
        fields.append((f"models[{i}]", m.get("model") if isinstance(m, dict) else m))
    resolved = [_resolve(path, name, value) for name, value in fields]
    base = resolved[0]
    return base, [p for p in resolved[1:] if p != base]


def _resolve(yaml_path: Path, field_name: str, value: Any) -> Path:
    """A model reference made absolute (each half of `BASE+ADAPTER`), its folders checked."""
    from evomerge.io.inputs import resolve_ref, split_ref

    if not isinstance(value, (str, Path)):
        raise ConfigError(f"{yaml_path}: field `{field_name}` must be a model directory path, got {value!r}")
    ref = resolve_ref(str(Path(str(value)).expanduser()), yaml_path.parent.resolve())
    for part in filter(None, split_ref(ref)):
        if not Path(part).is_dir():
            raise ModelError(
                f"{yaml_path}: field `{field_name}`: model directory {part} does not exist; fix the path "
                "(relative paths resolve from the YAML's folder)"
            )
    model, adapter = split_ref(ref)
    return Path(model).resolve() if adapter is None else Path(f"{Path(model).resolve()}+{Path(adapter).resolve()}")


def _recipe_inputs(path: Path) -> tuple[Path, list[Path]]:
    from evomerge.merge.recipe import Recipe

    recipe = Recipe.load(path)
    if not recipe.base_model:
        raise ConfigError(
            f"{path}: field `base_model` is missing; audit measures task vectors against it, "
            "so add the common ancestor as base_model"
        )
    base = _resolve(path, "base_model", str(recipe.base_model))
    models = [_resolve(path, recipe.field_of(m), m) for m in recipe.input_models() if m != recipe.base_model]
    return base, [m for m in models if m != base]


def audit_dirs(
    base: Path | str,
    models: Sequence[Path | str],
    sample: int = SAMPLE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    allow_config_mismatch: bool = False,
) -> AuditReport:
    """Open the checkpoints (full ones or LoRA adapters over `base`), check they are compatible (ModelError naming
    the first mismatch; vocabularies may differ), audit them. Where a model's vocabulary differs from the base's,
    the report lists the difference and its embeddings and head are compared over the base's tokens (rows of
    tokens it lacks: the base's, as a `tokenizer_source: base` merge lays them out)."""
    from evomerge.io.checkpoint import check_compatible
    from evomerge.io.inputs import open_inputs

    refs = [str(base), *map(str, models)]
    opened = open_inputs(refs, str(base))
    ckpts = [opened[r] for r in refs]
    check_compatible(ckpts, allow_config_mismatch=allow_config_mismatch, vocab_may_differ=True)
    labels = _labels([Path(r) for r in refs])
    lines, sources = _vocab_aligned(ckpts, labels)
    report = audit(sources[0], sources[1:], labels=(labels[0], labels[1:]), sample=sample, seed=seed, progress=progress)
    return report.model_copy(update={"vocabulary": lines})


def _vocab_aligned(ckpts: Sequence[Any], labels: Sequence[str]) -> tuple[list[str], list[TensorSource]]:
    """The vocabularies' differences, one line per model that differs, and each checkpoint as the audit reads it
    (a model with another vocabulary aligned to the base's)."""
    from evomerge.io.checkpoint import vocab_rows
    from evomerge.io.tokenizers import has_tokenizer
    from evomerge.merge.vocab import input_vocabs

    if all(c.vocab() == ckpts[0].vocab() and vocab_rows(c) == vocab_rows(ckpts[0]) for c in ckpts[1:]):
        return [], list(ckpts)
    if not all(has_tokenizer(c.model_dir) for c in ckpts):
        return [], list(ckpts)  # tensor shapes were checked: nothing to align
    from evomerge.merge.vocab import describe_difference, vocab_plan_for

    keyed = dict(zip(labels, ckpts))
    lines = describe_difference(labels[0], input_vocabs(keyed))
    sources: list[TensorSource] = []
    for label, ckpt in list(keyed.items())[1:]:
        plan = vocab_plan_for("base", {labels[0]: ckpts[0], label: ckpt}, labels[0])
        if not sources:  # the base too, in its own vocabulary (rows past its tokenizer's, padding, left out)
            sources.append(_InBaseVocab(ckpts[0], ckpts[0], plan, labels[0], labels[0]))
        sources.append(_InBaseVocab(ckpts[0], ckpt, plan, label, labels[0]))
    return lines, sources


class _InBaseVocab:
    """A model read with its vocabulary tensors laid out in the base's vocabulary."""

    def __init__(self, base: Any, model: Any, plan: Any, key: str, base_key: str):
        self.base, self.model, self.plan, self.key, self.base_key = base, model, plan, key, base_key

    def tensor_names(self) -> Sequence[str]:
        return self.model.tensor_names()

    def get(self, name: str) -> torch.Tensor:
        from evomerge.merge.vocab import align_rows

        if name not in self.plan.tensors:
            return self.model.get(name)
        maps = [self.plan.maps[self.base_key], self.plan.maps[self.key]]
        return align_rows([self.base.get(name), self.model.get(name)], maps, base=0)[1]


def _labels(paths: Sequence[Path]) -> list[str]:
    """Shortest distinct labels: folder names, with parents added while two different folders collide."""
    labels = [p.name for p in paths]
    depth = 1
    while len({(lab, p) for lab, p in zip(labels, paths)}) > len(set(labels)) and depth < 4:
        depth += 1
        labels = ["/".join(p.parts[-depth:]) for p in paths]
    counts = {lab: labels.count(lab) for lab in labels}
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # the same folder listed twice: add#1, add#2
        if counts[lab] > 1:
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab}#{seen[lab]}"
    return labels


def format_table(report: AuditReport) -> str:
    """The per-row, per-kind table printed by `evomerge audit`."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["row", "kind", "params", "cosine", "spearman", "conflict", "|d|/|base|"]
    rows = [
        [
            g.row,
            g.kind,
            f"{g.n_params:,}",
            num(g.cosine, "+.3f"),
            num(g.spearman, "+.3f"),
            num(g.conflict, ".3f"),
            num(g.magnitude, ".3g"),
        ]
        for g in report.groups
    ]
    return text_table(header, rows, "llrrrrr", sep=" ", min_widths=[10, 9, 10])
