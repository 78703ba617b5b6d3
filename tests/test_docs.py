"""The docs agree with the code: every config field has a row in docs/config.md with the default the code has, and
every relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
CONFIG_DOC = REPO / "docs" / "config.md"


def render(value) -> str:
    """A default as docs/config.md writes it (YAML flow style, keys sorted)."""
    if isinstance(value, BaseModel):
        return render(value.model_dump(mode="json"))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def _models_in(annotation) -> list[tuple[type[BaseModel], str]]:
    """The pydantic models a field's type holds, each with how its path continues ("" direct, "[]" list items,
    ".<name>" dict values)."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if origin in (list, tuple):
        return [(m, "[]" + rest) for arg in typing.get_args(annotation) for m, rest in _models_in(arg)]
    if origin is dict:
        return [(m, ".<name>" + rest) for m, rest in _models_in(typing.get_args(annotation)[1])]
    return [pair for arg in typing.get_args(annotation) for pair in _models_in(arg)]


def config_fields() -> dict[str, str]:
    """{dotted field: its default as the docs write it} for the search config and its search space, each model
    documented once (validation.tasks holds the entries tasks.search documents)."""
    from evomerge.candidate.space import SpaceSpec
    from evomerge.config.schema import SearchConfig

    out: dict[str, str] = {}
    seen: set[type] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        seen.add(model)
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            if field.is_required():
                out[path] = "required"
            else:
                out[path] = render(field.default_factory() if field.default_factory else field.default)
            for sub, rest in _models_in(field.annotation):
                if sub not in seen:
                    walk(sub, f"{path}{rest}.")

    walk(SearchConfig, "")
    walk(SpaceSpec, "search_space.")
    return out


def documented() -> dict[str, str]:
    rows = {}
    for line in CONFIG_DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]*?)\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_the_walk_sees_nested_models_lists_and_dicts():
    fields = config_fields()
    assert fields["refine.steps"] == "60" and fields["tasks.search[].subset"] == "null"
    assert fields["sampler.warm_start.study"] == "required"
    assert fields["search_space.parameters.<name>.per_layer"] == "true"
    assert "validation.tasks[].name" not in fields, "TaskSpec is documented once, under tasks.search"


def test_every_config_field_is_documented_with_its_default(monkeypatch):
    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)  # the documented default
    rows = documented()
    missing = [path for path in config_fields() if path not in rows]
    assert missing == [], f"add rows to docs/config.md for: {', '.join(missing)}"
    wrong = {p: (rows[p], d) for p, d in config_fields().items() if rows[p] != d}
    assert wrong == {}, "docs/config.md default (documented, code): " + repr(wrong)
    stale = sorted(set(rows) - set(config_fields()))
    assert stale == [], f"docs/config.md documents fields the config does not have: {stale}"


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_that_exist(page):
    dead = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target or target.startswith("#") or target.startswith("mailto:"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            dead.append(target)
    assert dead == [], f"{page.name}: dead links {dead}"


def test_the_eval_tasks_readme_lists_every_skill():
    from evomerge.zoo.skills import SKILLS

    text = (REPO / "eval_tasks" / "README.md").read_text()
    assert all(f"| {name} |" in text for name in SKILLS), "eval_tasks/README.md: a row per skill"


def test_the_readmes_first_search_config_is_valid():
    """The README's "first search of your own" config loads as written (its files need the demo zoo)."""
    import yaml

    from evomerge.config.schema import parse_config

    text = (REPO / "README.md").read_text()
    block = text.split("## A first search of your own", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(yaml.safe_load(block), "README.md", REPO, check_files=False)
    assert cfg.name == "mine" and cfg.base_model == REPO / "zoo" / "base" and cfg.search_space["name"] == "ties"
