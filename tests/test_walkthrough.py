"""docs/walkthrough.md followed as a new user would: every `bash` block of the page, as written, in order.

The commands are read from the markdown itself (fenced blocks whose info string is `bash`; the `shell` block that
needs network is the one step not run), so the page and the code cannot drift. They run in a fresh folder with the
clone's `scripts/` linked in, `evomerge` and `python` on PATH (this tree's package), offline. The one thing the page
asks the user to bring from a networked machine, ARC-Easy in the Hugging Face datasets cache, is laid out here as
`datasets.load_dataset` leaves it (`allenai___ai2_arc/ARC-Easy/0.0.0/<revision>/`, written by datasets' own
builder), with made-up rows in ARC's schema: the real lm-eval task YAML then loads it through datasets' offline
cache, as it would load the real one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from docpages import REPO, page_blocks, run_blocks, user_folder

PAGE = REPO / "docs" / "walkthrough.md"


def arc_easy_cache(cache: Path, rows: int = 120) -> None:
    """ARC-Easy (train, validation, test) in `cache` as `load_dataset('allenai/ai2_arc', 'ARC-Easy')` leaves it."""
    from datasets.packaged_modules.json.json import Json

    source = cache.parent / "arc_rows"
    source.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "validation", "test"):
        lines = []
        for i in range(rows):
            a, b = i % 9, (i * 7) % 10
            choices = {"text": [str(a + b), str(a + b + 1), str(a), str(b)], "label": ["A", "B", "C", "D"]}
            lines.append(
                json.dumps({"id": f"{split}{i}", "question": f"{a}+{b}", "choices": choices, "answerKey": "A"})
            )
        files[split] = str(source / f"{split}.jsonl")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    build = cache.parent / "arc_build"
    Json(cache_dir=str(build), config_name="ARC-Easy", data_files=files, dataset_name="ai2_arc").download_and_prepare()
    (built,) = [p for p in build.glob("ai2_arc/ARC-Easy*/0.0.0") if p.is_dir()]
    target = cache / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / ("0" * 40)
    target.mkdir(parents=True)
    for f in built.iterdir():
        if f.suffix in (".arrow", ".json"):
            shutil.copy(f, target / f.name)


def prepare(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The user's folder and environment (tests/docpages.py), with ARC-Easy in its datasets cache."""
    home, env = user_folder(tmp_path)
    arc_easy_cache(Path(env["HF_DATASETS_CACHE"]))
    return home, env


def test_the_page_has_the_steps_it_promises():
    blocks = page_blocks(PAGE.read_text())
    runnable = "\n".join(body for info, body in blocks if info == "bash")
    for command in (
        "evomerge tasks split",
        "evomerge eval",
        "--include-defaults",
        "evomerge search",
        "evomerge export",
    ):
        assert command in runnable, command
    assert [info for info, _ in blocks].count("shell") == 1  # the networked step, the only one not run


def test_walkthrough_runs_as_written(tmp_path):
    home, env = prepare(tmp_path)
    outputs = run_blocks(PAGE, home, env)
    # the splits are disjoint by prompt and cover the file
    rows = [json.loads(line) for line in (home / "data" / "mine.jsonl").read_text().splitlines()]
    prompts = {}
    for part in ("search", "val", "heldout"):
        lines = (home / "my_tasks" / "data" / f"mine_{part}.jsonl").read_text().splitlines()
        prompts[part] = {json.loads(line)["prompt"] for line in lines}
    assert not (prompts["search"] & prompts["val"]) and not (prompts["search"] & prompts["heldout"])
    assert not (prompts["val"] & prompts["heldout"])
    assert set().union(*prompts.values()) == {r["prompt"] for r in rows}
    # the built-in task scored from the cache, the search exported a recipe that reproduces its checkpoint
    text = "\n".join(outputs)
    assert re.search(r"arc_easy\s+acc\s", text) and re.search(r"mine_search\s+exact_match\s", text)
    recipe = (home / "runs" / "mine" / "best" / "recipe.yaml").read_text()
    assert "merge_method: task_arithmetic" in recipe and "study: mine" in recipe
    assert (home / "runs" / "mine" / "report" / "report.md").is_file()
    assert (home / "again" / "model.safetensors").read_bytes() == (
        home / "runs" / "mine" / "best" / "model" / "model.safetensors"
    ).read_bytes()
