"""The search config: one YAML file, validated once where it enters (`load_config`). Pure pydantic: loading a
config imports no Optuna, Ray, torch or lm-eval (the sampler registry, `study.samplers`, is data).

    evomerge search configs/demo.yaml

`SearchConfig` and its sections: `tasks` (TasksConfig, entries `scoring.tasks.TaskSpec`), `sampler`
(SamplerConfig, `warm_start`: a run directory or WarmStartConfig), `budget`, `workers`, `validation`, `refine`,
`early_stop`; the search space (`search_space`) is `space.SpaceSpec`, resolved and stored inline. Every field,
its default and an example: docs/config.md (tests/test_docs.py checks it against these models).

Relative paths (models, include paths, a search-space path) are relative to the config file; run
directories (`runs/<name>/`) and the default storage are relative to the current directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from evomerge.config.rundir import RunDir
from evomerge.errors import ConfigError, describe_validation
from evomerge.merge.registry import REGISTRY
from evomerge.scoring.tasks import TaskSpec
from evomerge.storage_url import remember
from evomerge.study.samplers import SAMPLERS, check_sampler

# Fields that may change between runs of one study without making its trials incomparable.
RUNTIME_FIELDS = (
    "budget",
    "workers",
    "storage",
    "validation",
    "refine",
    "early_stop",
    "portfolio",
    "allow_config_mismatch",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TasksConfig(_Strict):
    include_paths: list[Path] = []
    include_defaults: bool = Field(False, description="also index lm-eval's built-in tasks (~30 s per process)")
    search: list[TaskSpec] = Field(min_length=1)
    heldout: list[str] = []
    smooth: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of each search task's score that is the answer's "
        "probability instead of its metric (scoring/staged.py); 0: the metric alone",
    )

    @field_validator("search")
    @classmethod
    def _unique(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task {dupes[0]!r} is listed twice; list each search task once")
        return tasks


class WarmStartConfig(_Strict):
    """An earlier study on the same models and search space, by name and storage URL."""

    study: str
    storage: str

    @field_validator("storage")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        return remember(url)  # the password stays in this process's memory (evomerge.storage_url), never in a dump


class SamplerConfig(_Strict):
    name: str = "cmaes"
    seed: int | None = None
    options: dict[str, Any] = {}
    warm_start: str | WarmStartConfig | None = Field(None, description="a run directory, or {study, storage}")

    @model_validator(mode="after")
    def _known(self) -> SamplerConfig:
        check_sampler(self.name, self.options, warm_start=self.warm_start is not None)
        return self


class ValidationConfig(_Strict):
    """Before export, re-score the `top_k` trials and every baseline (default merges, each source alone) on larger
    `tasks` (validation splits); export the best there."""

    top_k: int = Field(3, gt=0)
    tasks: list[TaskSpec] = Field(min_length=1)
    early_stop: bool = Field(
        True,
        description="score each finalist in stages (the search's early_stop stages and z) and stop one that is "
        "clearly worse than the best finalist validated whole; off when the search's early_stop is off or a "
        "validation metric is not a mean over examples",
    )


Arm = Literal["tensor", "rows", "distill"]  # a refinement round's kind


class RefineConfig(_Strict):
    """Gradient refinement (refine/tensor.py, refine/rows.py): at each fraction `at` of the budget, follow the
    gradient of the search examples' loss from the best trial so far, and enqueue the points it passes (every
    `every` of `steps` Adam steps) as trials. Round r is of kind `arms[r % len(arms)]`, so a larger budget (more
    rounds, `at: auto`) tries every kind, and the validation guard chooses among all their points."""

    at: list[float] | Literal["auto"] = Field(
        "auto",
        description="fractions of budget.n_trials at which a round starts; auto: one round per 25 trials (2 to "
        "8), spread from 0.5 to 0.85 of the budget ([0.5, 0.85] up to 74 trials)",
    )
    arms: list[Arm] = Field(
        ["tensor", "tensor", "rows", "distill"],
        min_length=1,
        description="the kind of each round, cycled: tensor (the space's numbers, likelihood), rows (and one "
        "coefficient per output row, likelihood), distill (per-row, distillation of each task's best source); "
        "rows and distill run with task_arithmetic and ties and make the exported recipe evomerge-only",
    )
    steps: int | Literal["auto"] = Field(
        60, description="Adam steps per round; auto: 0.6 per trial of budget.n_trials (60 at 100), at least 10"
    )
    every: int | Literal["auto"] = Field(10, description="steps between enqueued points; auto: six points per round")
    lr: float = Field(0.05, gt=0, description="Adam step, in units of each parameter's search range")
    examples: int | None = Field(
        None,
        gt=0,
        description="examples per task the gradient sees (default: each task's search subset; on a model whose "
        "step over them passes refine/footprint.py's budget, fewer, at least 8)",
    )
    row_lr: float | Literal["auto"] = Field(
        "auto",
        description="the Adam step of a rows or distill round's per-row coefficients; auto: lr, or lr / 5 where the "
        "gradient sees a sample of fewer examples than the search subsets (a larger model, refine/footprint.py), "
        "whose few examples hundreds of thousands of coefficients otherwise learn by heart within ten steps",
    )
    balance: bool = Field(
        True,
        description="scale each task's loss so that, at a round's start, every task's gradient is as large as the "
        "steepest one's (at most 30x): a skill the merge lost to chance, whose loss is flat, is not drowned out by a "
        "long generated answer's; false: the tasks' losses weighted as the objective weighs their scores",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"grain", "loss"} & data.keys():
            raise ValueError(
                "refine.grain and refine.loss became refine.arms: write `arms: [rows]` for grain rows, "
                "`arms: [distill]` for loss distill, `arms: [tensor]` for the per-tensor refinement alone"
            )
        return data

    @field_validator("at")
    @classmethod
    def _fractions(cls, at: list[float] | str) -> list[float] | str:
        if isinstance(at, list) and (any(not 0 <= f < 1 for f in at) or at != sorted(set(at))):
            raise ValueError(f"{at}: give increasing fractions of the budget in [0, 1), e.g. [0.5, 0.85], or auto")
        return at

    @field_validator("steps", "every")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value}: give a positive number of steps, or auto")
        return value

    def schedule(self, n_trials: int) -> tuple[int, int]:
        """(steps, every) of each round for a budget of `n_trials` trials (`auto` resolved)."""
        steps = max(10, round(0.6 * n_trials)) if self.steps == "auto" else self.steps
        every = max(1, steps // 6) if self.every == "auto" else self.every
        return steps, every

    def starts(self, n_trials: int) -> list[int]:
        """The trial count at which each round starts, for a budget of `n_trials` (`at: auto` resolved)."""
        at = self.at
        if at == "auto":
            n = min(8, max(2, n_trials // 25))
            at = [0.5 + 0.35 * i / (n - 1) for i in range(n)]
        return [math.floor(f * n_trials) for f in at]

    def arm(self, r: int) -> Arm:
        """The kind of round `r`."""
        return self.arms[r % len(self.arms)]

    def arms_run(self, n_trials: int) -> set[str]:
        """The kinds of the rounds a budget of `n_trials` runs."""
        return {self.arm(r) for r in range(len(self.starts(n_trials)))}


class EarlyStopConfig(_Strict):
    """Staged evaluation (scoring/staged.py): a sampled candidate is scored on `stages` (fractions of each search
    subset) first and stops when it is worse than the best trial by more than `z` standard errors."""

    stages: list[float] = Field([0.2, 0.5], description="fractions of each subset scored before a check")
    z: float = Field(2.0, gt=0)

    @field_validator("stages")
    @classmethod
    def _fractions(cls, stages: list[float]) -> list[float]:
        if not stages or any(not 0 < f < 1 for f in stages) or stages != sorted(set(stages)):
            raise ValueError(f"{stages}: give increasing fractions in (0, 1), e.g. [0.2, 0.5]")
        return stages


class BudgetConfig(_Strict):
    n_trials: int = Field(20, gt=0, description="COMPLETE trials the study ends with")
    timeout: float | None = Field(None, gt=0, description="seconds this run may spend asking new trials")


class WorkersConfig(_Strict):
    count: int = Field(
        1, ge=0, description="Ray actors; 0 evaluates in the driver process, without Ray (debugging, tests)"
    )
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per worker: a share of one (0.5), one, or N whole GPUs the model is split over"
    )
    address: str | None = None
    batch_size: int | Literal["auto"] | None = Field(
        None,
        description="lm-eval's evaluation batch: null sizes it from the plan (64 on CPU; on GPU the largest that "
        "fits beside the model), an int fixes it, auto is lm-eval's own search",
    )

    @field_validator("num_gpus")
    @classmethod
    def _whole(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"{value:g}: a worker on several GPUs takes whole GPUs; write 2, 4 or 8 (or 0.5 to share)")
        return value

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value}: give at least 1, auto, or leave it out")
        return value


def _default_kernels() -> str:
    from evomerge.merge.kernels import default_kernels

    return default_kernels()  # $EVOMERGE_KERNELS, else evomerge-1; the resolved config records it


class SearchConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base_model: Path
    models: list[Path] = Field(min_length=1)
    method: str
    search_space: str | dict[str, Any] | None = None
    tasks: TasksConfig
    sampler: SamplerConfig = SamplerConfig()
    budget: BudgetConfig = BudgetConfig()
    storage: str | None = None
    workers: WorkersConfig = WorkersConfig()
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    kernels: str = Field(default_factory=_default_kernels, description="kernel set: evomerge-1 or mergekit-0.1.5")
    validation: ValidationConfig | None = None
    refine: RefineConfig | None = RefineConfig()
    early_stop: EarlyStopConfig | None = EarlyStopConfig()
    portfolio: bool | list[str] = Field(
        True,
        description="also score other methods' default merges (evomerge/candidate/portfolio.py) on the search "
        "subsets, as references for the guard, status and export: true, every one (but the subspace merges the "
        "plan prices above the trials), false, none, or a list of methods",
    )

    @field_validator("portfolio")
    @classmethod
    def _portfolio_methods(cls, value: bool | list[str]) -> bool | list[str]:
        from evomerge.merge.registry import names

        if isinstance(value, list):
            known = names(portfolio=True)
            bad = [m for m in value if m not in known]
            if bad:
                raise ValueError(f"{bad[0]!r} has no default merge in the portfolio; name some of {', '.join(known)}")
        return value

    allow_config_mismatch: bool = Field(
        False,
        description="merge models whose config.json differ in shape-defining "
        "fields (hidden size, layers, heads, vocabulary) when their tensors match",
    )
    tokenizer_source: str | None = Field(
        None,
        description="models with other vocabularies (added tokens): union, base or a tokenizer folder, as mergekit's "
        "tokenizer_source; every candidate and the export take that output vocabulary",
    )
    _source: str = PrivateAttr("search config")  # the file it was loaded from, for error messages

    @field_validator("kernels")
    @classmethod
    def _known_kernels(cls, value: str) -> str:
        from evomerge.merge.kernels import canonical_kernels

        return canonical_kernels(value)  # ValueError: "unknown kernel set ...; valid: ..."

    @field_validator("storage")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        return remember(url)  # the password stays in this process's memory (evomerge.storage_url), never in a dump

    @property
    def run_dir(self) -> Path:
        return RunDir.named(self.name).path

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL; sqlite paths made absolute (against the current directory)."""
        if self.storage and not self.storage.startswith("sqlite:///"):
            return self.storage
        db = Path(self.storage.removeprefix("sqlite:///")) if self.storage else RunDir(self.run_dir).study_db
        return f"sqlite:///{db.resolve()}"

    @property
    def sampler_seed(self) -> int:
        return self.seed if self.sampler.seed is None else self.sampler.seed

    @property
    def per_example(self) -> bool:
        """Whether search trials are scored per example (a smooth objective, or staged evaluation)."""
        return self.tasks.smooth > 0 or self.early_stop is not None

    @property
    def multi_objective(self) -> bool:
        return SAMPLERS[self.sampler.name].multi_objective

    def warm_start_source(self) -> tuple[str, str, str]:
        """(study name, storage URL, how messages name it) of `sampler.warm_start`: a run directory (its resolved
        config names both) or {study, storage}."""
        ref = self.sampler.warm_start
        if isinstance(ref, WarmStartConfig):
            return ref.study, ref.storage, f"study {ref.study!r} in {ref.storage}"
        try:
            source = load_run_config(Path(str(ref)))
        except ConfigError as err:
            raise ConfigError(f"sampler.warm_start: {err}") from None
        return source.name, source.storage_url, f"run {ref} (study {source.name!r})"

    def study_fields(self) -> dict[str, Any]:
        """What identifies the study's trials: everything but the RUNTIME_FIELDS (budget, workers, storage,
        validation, refine, early_stop, portfolio, allow_config_mismatch), which a resume may change."""
        data = self.model_dump(mode="json")
        for key in RUNTIME_FIELDS:
            data.pop(key, None)
        if not data["tasks"].get("smooth"):  # added later: studies made before it keep their identity
            data["tasks"].pop("smooth", None)
        if not data["tasks"]["include_defaults"]:  # studies made before the field existed keep their hash
            del data["tasks"]["include_defaults"]
        if data.get("tokenizer_source") is None:  # likewise
            data.pop("tokenizer_source", None)
        for specs in data["tasks"].values():  # a task's chat_template left unset: as before the field existed
            for spec in specs if isinstance(specs, list) else ():
                if isinstance(spec, dict) and spec.get("chat_template") is None:
                    spec.pop("chat_template", None)
        return data

    def study_hash(self) -> str:
        text = json.dumps(self.study_fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _resolve(value: Any, base: Path) -> Any:
    """A path made absolute against the config's folder (each half of a `BASE+ADAPTER` model on its own)."""
    from evomerge.io.inputs import resolve_ref

    if not isinstance(value, str) or not value:
        return value
    return resolve_ref(value, base)


def _resolve_paths(data: dict, base: Path) -> dict:
    data = dict(data)
    if "base_model" in data:
        data["base_model"] = _resolve(data["base_model"], base)
    if isinstance(data.get("models"), list):
        data["models"] = [_resolve(m, base) for m in data["models"]]
    tasks = data.get("tasks")
    if isinstance(tasks, dict) and isinstance(tasks.get("include_paths"), list):
        data["tasks"] = {**tasks, "include_paths": [_resolve(p, base) for p in tasks["include_paths"]]}
    if data.get("tokenizer_source") not in (None, "union", "base"):
        data["tokenizer_source"] = _resolve(data["tokenizer_source"], base)
    space = data.get("search_space")
    if isinstance(space, str) and ("/" in space or space.endswith((".yaml", ".yml"))):
        data["search_space"] = _resolve(space, base)
    return data


def _check_files(cfg: SearchConfig, source: str) -> None:
    from evomerge.io.inputs import split_ref
    from evomerge.io.lora import is_adapter

    problems = []
    for name, path in [("base_model", cfg.base_model), *((f"models[{i}]", m) for i, m in enumerate(cfg.models))]:
        model, adapter = split_ref(path)
        if adapter is not None and not is_adapter(adapter):
            problems.append(f"{name!r}: {adapter} is not a PEFT adapter folder (no adapter_config.json); fix the path")
        elif not (Path(model) / "config.json").is_file() and not (name != "base_model" and is_adapter(model)):
            problems.append(
                f"{name!r}: {model} is not a model directory (no config.json) or a LoRA adapter (no "
                "adapter_config.json); fix the path"
            )
    if cfg.base_model in cfg.models:
        problems.append("'models' lists base_model; list only the models merged into it")
    tokenizer = cfg.tokenizer_source  # (`source` is the config file's name)
    if tokenizer not in (None, "union", "base") and not Path(tokenizer).is_dir():
        problems.append(f"'tokenizer_source': {tokenizer} is not a folder; use union, base or a tokenizer's folder")
    for i, p in enumerate(cfg.tasks.include_paths):
        if not p.is_dir():
            problems.append(f"'tasks.include_paths[{i}]': {p} is not a folder; fix the path")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _check_method(cfg: SearchConfig, source: str) -> None:
    """A method no registry entry has is the user's `method` (a typo, `task-arithmetic`), not the search space's."""
    from evomerge.errors import close_matches

    if cfg.method in REGISTRY:
        return
    hint = close_matches(cfg.method, REGISTRY) or f" (valid: {', '.join(sorted(REGISTRY))})"
    raise ConfigError(f"{source}: 'method': unknown merge method {cfg.method!r}{hint}; fix 'method'")


def parse_config(
    data: Any, source: str = "<config>", base_dir: Path | None = None, check_files: bool = True
) -> SearchConfig:
    """Validate a mapping (paths relative to `base_dir`) into a SearchConfig, with its search space."""
    from evomerge.candidate.space import load_space_spec

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    data = _resolve_paths(data, (base_dir or Path.cwd()).resolve())
    try:
        cfg = SearchConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation(err, SearchConfig)}") from None
    _check_method(cfg, source)
    default = REGISTRY[cfg.method].space if cfg.method in REGISTRY else None  # merge/registry.py
    spec = load_space_spec(cfg.search_space or default or cfg.method, source=f"{source}: 'search_space'")
    if cfg.method not in spec.methods:
        raise ConfigError(
            f"{source}: 'method' {cfg.method!r} is not searched by space {spec.name!r} "
            f"(it supports {', '.join(spec.methods)}); change 'method' or 'search_space'"
        )
    if spec.max_models is not None and len(cfg.models) > spec.max_models:
        raise ConfigError(
            f"{source}: 'models': method {cfg.method!r} merges base_model with at most {spec.max_models} "
            f"model(s), got {len(cfg.models)}; remove models or pick another method"
        )
    if check_files:
        _check_files(cfg, source)
    # The resolved config carries its search space inline, so a run never depends on a later edit.
    cfg = cfg.model_copy(update={"search_space": spec.model_dump(mode="json", exclude_none=True)})
    cfg._source = source
    return cfg


def load_config(path: Path | str, check_files: bool = True, **overrides: Any) -> SearchConfig:
    """Load and validate a search config file. `overrides`: n_trials, storage, workers (CLI flags);
    `check_files=False`: the model folders need not exist (`audit --plan --model-config`)."""
    from evomerge.io.yamlfile import read_yaml

    path = Path(path)
    data = read_yaml(path, "config file")
    cfg = parse_config(data, source=str(path), base_dir=path.parent, check_files=check_files)
    return apply_overrides(cfg, **overrides)


def apply_overrides(
    cfg: SearchConfig, n_trials: int | None = None, storage: str | None = None, workers: int | None = None
) -> SearchConfig:
    update: dict[str, Any] = {}
    if n_trials is not None:
        update["budget"] = cfg.budget.model_copy(update={"n_trials": n_trials})
    if storage is not None:
        update["storage"] = remember(storage)  # model_copy skips validators: mask the password here too
    if workers is not None:
        update["workers"] = cfg.workers.model_copy(update={"count": workers})
    return cfg.model_copy(update=update) if update else cfg


def load_run_config(run_dir: Path | str) -> SearchConfig:
    """The resolved config a run was started with (`runs/<name>/config.yaml`)."""
    path = RunDir.at(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; pass a run directory made by `evomerge search`")
    from evomerge.io.yamlfile import read_yaml

    return parse_config(read_yaml(path, "run config"), source=str(path), base_dir=path.parent, check_files=False)


def write_run_config(cfg: SearchConfig) -> Path:
    """Atomically write the resolved config (with its absolute storage URL) to `runs/<name>/config.yaml`."""
    from evomerge.io.atomic import write_file_atomic

    cfg = cfg.model_copy(update={"storage": cfg.storage_url})
    header = f"# resolved config of study {cfg.name!r}; `evomerge search` writes it on every run\n"
    return write_file_atomic(RunDir(cfg.run_dir).config, header + cfg.to_yaml())


def cpus_needed(cfg: SearchConfig) -> int:
    return max(1, math.ceil(cfg.workers.count * cfg.workers.num_cpus))


def diff_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


__all__ = [
    "SearchConfig",
    "load_config",
    "load_run_config",
    "parse_config",
    "write_run_config",
]
