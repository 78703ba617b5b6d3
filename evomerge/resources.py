"""The data evomerge ships inside its package: the search spaces, the lm-eval task folders, the model card's template.

    from evomerge.resources import SEARCH_SPACES, EVAL_TASKS, TEMPLATES

In a wheel they are plain folders in the installed package (`evomerge/search_spaces`, `evomerge/eval_tasks`);
in a source checkout those two are links to the repository's top-level `search_spaces/` and `eval_tasks/`,
which stay the files you edit. Found through importlib.resources, never by walking up from this file, so an
installed evomerge finds them with no source tree anywhere.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_folder(name: str) -> Path:
    """The shipped folder `name` as a real path (lm-eval and the YAML readers want files on disk; pip installs
    packages as files)."""
    return Path(str(files("evomerge").joinpath(name))).resolve()


SEARCH_SPACES = package_folder("search_spaces")
EVAL_TASKS = package_folder("eval_tasks")
TEMPLATES = package_folder("export/templates")  # the model card's (evomerge/export/templates/modelcard.md)

__all__ = ["EVAL_TASKS", "SEARCH_SPACES", "TEMPLATES", "package_folder"]
