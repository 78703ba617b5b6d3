"""One exception hierarchy, and the one way a validation error becomes a line.

User errors (EvomergeError) exit 2 with `evomerge: error: <one line>` naming the file, the field and the fix;
any other exception is a bug in evomerge and exits 1 with its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


class EvomergeError(Exception):
    """Base class. `str(err)` is the one line shown after `evomerge: error:`."""

    exit_code = 2


class ConfigError(EvomergeError):
    """A config, recipe or search space is malformed: names the file, the field and the fix."""


class ModelError(EvomergeError):
    """A model directory is missing, unreadable, unsafe to load, or incompatible with the others."""


class TaskError(EvomergeError):
    """An lm-eval task is unknown or broken."""


class StudyError(EvomergeError):
    """A study cannot be opened, resumed or exported as asked."""


class CandidateError(EvomergeError):
    """A candidate merge failed (NaN weights, an evaluation error); its trial fails with this reason."""


class TaskCodeError(CandidateError):
    """The user's lm-eval task code (a `!function` of a task YAML) raised while scoring a candidate."""


class RecipeWarning(UserWarning):
    """Something in a recipe that evomerge accepts and ignores, as mergekit does (a parameter its method does not
    read): `evomerge merge` prints it as one `evomerge: warning: ...` line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's time limit, `timeout`, Kubernetes): the command stops cleanly.
    `detail` says what was stopped and how to go on; the CLI prints one line and exits 128 + the signal number."""

    def __init__(self, signal_name: str = "SIGINT", detail: str = ""):
        super().__init__(detail)
        self.signal_name, self.detail = signal_name, detail

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' — for error messages that name an unknown key."""
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(found)}?)" if found else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): third-party errors in one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def describe_validation(err: ValidationError, root: type[BaseModel], quote: bool = True) -> str:
    """Every pydantic error of `root` on one line: `field 'a.b': problem; field 'c': ...`, unknown fields with
    "did you mean" among the fields valid where they were found; one error per field (unions report one per member).
    `quote=False` writes `field a.b` (recipes: the form their other messages use, `models[0].parameters.x`)."""
    names = _model_names(root)
    seen: dict[str, str] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not _is_union_tag(p, names))
        field = ".".join(str(p) for p in loc)
        field = repr(field) if quote else field
        if e["type"] == "extra_forbidden":
            fields = [f for model in _models_at(root, loc) for f in model.model_fields]
            part = f"unknown field {field}{close_matches(str(loc[-1]), fields) or '; remove it'}"
        elif e["type"] == "missing":
            part = f"field {field} is required; add it"
        elif e["type"] in _BOUNDS:
            op, bound = next(
                (_BOUNDS[e["type"]], v) for k, v in (e.get("ctx") or {}).items() if k in ("gt", "ge", "lt", "le")
            )
            part = f"field {field}: {e['input']!r} is out of range; set it to a number {op} {bound}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            part = f"field {field}: {msg}" if loc else msg
        seen.setdefault(field, part)
    return "; ".join(seen.values())


_BOUNDS = {  # pydantic's range errors, said as the fix
    "greater_than": "greater than",
    "greater_than_equal": "of at least",
    "less_than": "less than",
    "less_than_equal": "of at most",
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (`X`, `list[X]`, `X | None`, `dict[str, X | list[X]]`)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _models_at(root: type[BaseModel], loc: tuple) -> list[type[BaseModel]]:
    """The models whose fields are valid at `loc[-1]`; list indexes and dict keys are stepped over."""
    models = [root]
    for part in loc[:-1]:
        inner = [
            m
            for model in models
            if str(part) in model.model_fields
            for m in _models_in(model.model_fields[str(part)].annotation)
        ]
        if inner:
            models = inner
    return models


def _model_names(root: type[BaseModel]) -> set[str]:
    names, todo = set(), [root]
    while todo:
        model = todo.pop()
        if model.__name__ not in names:
            names.add(model.__name__)
            todo += [m for f in model.model_fields.values() for m in _models_in(f.annotation)]
    return names


def _is_union_tag(part: Any, model_names: set[str]) -> bool:
    """pydantic names the union member an error came from (`str`, `list[...]`, `ConditionalParameter`) in `loc`."""
    return isinstance(part, str) and ("[" in part or part in {"bool", "int", "float", "str"} or part in model_names)
