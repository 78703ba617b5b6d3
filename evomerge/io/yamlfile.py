"""Reading user YAML: `yaml.safe_load` only, and one-line errors that name the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{source}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"
        ) from None


def read_yaml(path: Path | str, what: str = "YAML file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}; check the path")
    return parse_yaml(path.read_text(), str(path))
