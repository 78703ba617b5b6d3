"""One exception hierarchy. User errors exit 2 with a one-line message; anything else is a bug (exit 1)."""
from __future__ import annotations


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


def close_matches(word: str, choices, n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' — for error messages that name an unknown key."""
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(found)}?)" if found else ""
