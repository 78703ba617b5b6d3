"""Task specs and the catalog that builds lm-eval tasks from YAML folders, once.

lm-eval resolves `dataset_kwargs.data_files` against the working directory; the catalog rewrites relative
data files (and a relative local `dataset_path`) against the folder of the YAML that names the task, so the
shipped `eval_tasks/` and user task folders work from any working directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import TaskError, close_matches, first_line
from evomerge.resources import EVAL_TASKS

if TYPE_CHECKING:
    from lm_eval.api.task import Task

BUILTIN_TASKS = EVAL_TASKS  # the shipped task folders, inside the installed package


class TaskSpec(BaseModel):
    """One lm-eval task (or tag) to score, the metric the objective reads, its weight and example subset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    metric: str = "acc"
    weight: float = Field(1.0, gt=0)
    subset: int | None = Field(None, ge=1, description="N examples: a fixed sample seeded by the scorer's seed")
    chat_template: bool | None = Field(
        None,
        description="render prompts through the model's chat template (lm-eval's apply_chat_template); "
        "None: as the task's YAML says (`metadata: {chat_template: true}`), else off",
    )


def as_spec(task: TaskSpec | str) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TaskSpec(name=task)


def task_folders(include_paths: Sequence[str | Path] = ()) -> list[Path]:
    """The shipped `eval_tasks/` (when present) then the user's folders, which may override shipped tasks."""
    folders = [BUILTIN_TASKS] if BUILTIN_TASKS.is_dir() else []
    for p in include_paths:
        path = Path(p).expanduser().resolve()
        if not path.is_dir():
            raise TaskError(f"task folder {p} does not exist; pass a folder of lm-eval task YAML files")
        folders.append(path)
    return folders


def _is_local(path: str) -> bool:
    return "://" not in path and not Path(path).is_absolute()


def resolve_data_paths(cfg: dict[str, Any], yaml_dir: Path) -> dict[str, Any]:
    """Relative `data_files` (str, list, or split -> str/list) and a relative local `dataset_path` -> absolute."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")

    def fix(value):
        if isinstance(value, str):
            return str(yaml_dir / value) if _is_local(value) else value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    out = dict(cfg)
    if files is not None:
        out["dataset_kwargs"] = {**kwargs, "data_files": fix(files)}
    path = cfg.get("dataset_path")
    if isinstance(path, str) and _is_local(path) and (yaml_dir / path).exists():
        out["dataset_path"] = str(yaml_dir / path)
    return out


def _offline_hint(exc: BaseException) -> str:
    """How to fix a dataset that is not in the local cache (evomerge runs offline): fill the cache where there is
    network, as docs/walkthrough.md shows."""
    import re

    text = str(exc)
    match = re.search(r"Couldn't reach '([^']+)' on the Hub", text)
    if match is None and "OfflineModeIsEnabled" not in text:
        return ""
    dataset = match.group(1) if match else "the dataset"
    return (
        f"; {dataset} is not in the local Hugging Face datasets cache (HF_DATASETS_CACHE, default "
        f"~/.cache/huggingface/datasets): load it once where there is network (datasets.load_dataset('{dataset}', "
        "CONFIG)) and copy that cache here (docs/walkthrough.md)"
    )


class TaskCatalog:
    """lm-eval's TaskManager over our task folders. `build(name)` -> {leaf task name: Task}."""

    def __init__(self, include_paths: Sequence[str | Path] = (), *, include_defaults: bool = False):
        from lm_eval.tasks import TaskManager

        self.folders = task_folders(include_paths)
        # lm-eval's own 14k-task index takes ~30 s to build: only on request, and then only when a task is not in
        # the folders (a process whose tasks are all local never pays for it; a folder's task wins over a built-in)
        self.manager = TaskManager(include_path=[str(f) for f in self.folders], include_defaults=False)
        self._local = self.manager  # the folders' index, looked up first
        self.include_defaults = include_defaults

    @property
    def names(self) -> list[str]:
        if self.include_defaults:
            self._index_defaults()
        return self.manager.all_tasks

    def _index_defaults(self) -> None:
        """Replace the folders' index by one with lm-eval's built-in tasks too (once)."""
        from lm_eval.tasks import TaskManager

        if self.manager is self._local:
            self.manager = TaskManager(include_path=[str(f) for f in self.folders], include_defaults=True)

    def _entry(self, name: str):
        entry = self._local.task_index.get(name)
        if entry is None and self.include_defaults:
            self._index_defaults()
            entry = self.manager.task_index.get(name)
        return entry

    def code_folders(self) -> list[Path]:
        """Where task code lives: the task folders (their `!function` files), and lm-eval's own tasks when indexed."""
        if not self.include_defaults:
            return list(self.folders)
        import lm_eval.tasks

        return [*self.folders, Path(lm_eval.tasks.__file__).parent]

    def build(self, name: str) -> dict[str, Task]:
        from lm_eval.tasks._index import Kind

        if name.endswith((".yaml", ".yml")) and Path(name).is_file():
            return self._build_yaml(Path(name).resolve())
        entry = self._entry(name)
        if entry is None:
            raise TaskError(self._unknown(name))
        if entry.kind == Kind.TAG:
            out: dict[str, Task] = {}
            for leaf in sorted(entry.tags):
                out.update(self.build(leaf))
            return out
        if entry.kind == Kind.TASK and entry.yaml_path is not None:
            return self._build_yaml(Path(entry.yaml_path))
        return self._load(name, entry.yaml_path)  # groups and Python tasks: lm-eval's own loading

    def _build_yaml(self, yaml_path: Path) -> dict[str, Task]:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(yaml_path, resolve_func=True)
        if "task" not in cfg or "group" in cfg:
            raise TaskError(f"{yaml_path} is not a single-task YAML (it needs a `task:` key and no `group:`)")
        cfg.pop("tag", None)
        return self._load(resolve_data_paths(cfg, yaml_path.parent), yaml_path)

    def _load(self, spec: str | dict, yaml_path: Path | None) -> dict[str, Task]:
        name = spec if isinstance(spec, str) else spec["task"]
        try:
            return dict(self.manager.load([spec])["tasks"])
        except Exception as exc:  # lm-eval raises anything from a bad YAML or missing data
            hint = _offline_hint(exc)
            raise TaskError(f"task {name} ({yaml_path or 'lm-eval'}) failed to load: {first_line(exc)}{hint}") from exc

    def _unknown(self, name: str) -> str:
        where = ", ".join(str(f) for f in self.folders) or "no task folders"
        hint = (
            ""
            if self.include_defaults
            else (
                "; lm-eval's built-in tasks are indexed only on request: `tasks.include_defaults: true` in a search "
                "config, --include-defaults for `evomerge eval`"
            )
        )
        return (
            f"unknown task {name!r}{close_matches(name, self.names)}; searched {where} (add a task folder: "
            f"`tasks.include_paths` in a search config, --include-path DIR for `evomerge eval`){hint}"
        )


CHAT_TEMPLATE_KEY = "chat_template"  # a task YAML's `metadata:` key asking for the model's chat template


def wants_chat_template(task: Task, spec: TaskSpec) -> bool:
    """Whether `task` is scored through the model's chat template: the spec's `chat_template` when set, else the
    task YAML's `metadata: {chat_template: true}` (an instruct model's task says so once, for every caller)."""
    if spec.chat_template is not None:
        return spec.chat_template
    metadata = task.get_config("metadata") or {}
    return bool(metadata.get(CHAT_TEMPLATE_KEY, False)) if isinstance(metadata, dict) else False


def metric_names(task: Task) -> list[str]:
    """Metrics a task reports: `acc`, ... and `acc,<filter>` for each non-default filter."""
    base = list(task.aggregation())
    filters = [f.name for f in getattr(task, "_filters", [])]
    return base + [f"{m},{f}" for f in filters if f != "none" for m in base]
