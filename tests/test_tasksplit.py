"""`evomerge tasks split` (evomerge/tasksplit.py): the walkthrough's step 3 from the installed package, not only
a clone's scripts/: three disjoint tasks lm-eval builds, the same bytes as the script, bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from evomerge.cli import main

REPO = Path(__file__).resolve().parent.parent


def examples(tmp: Path) -> Path:
    path = tmp / "mine.jsonl"
    rows = [{"prompt": f"{i % 25}+1=", "answer": str(i % 25 + 1)} for i in range(40)]  # 25 prompts, some repeated
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_writes_three_disjoint_tasks_lm_eval_builds(tmp_path, capsys):
    from evomerge.scoring import Scorer, TaskSpec

    source = examples(tmp_path)
    assert main(["tasks", "split", str(source), "--name", "mine", "--out", str(tmp_path / "t")]) == 0
    assert "tasks written to" in capsys.readouterr().out
    prompts = {}
    for name, part in (("search", "search"), ("val", "validation"), ("heldout", "heldout")):
        rows = [json.loads(line) for line in (tmp_path / "t" / "data" / f"mine_{name}.jsonl").read_text().splitlines()]
        prompts[part] = {r["prompt"] for r in rows}
    assert not (prompts["search"] & prompts["validation"] or prompts["search"] & prompts["heldout"])
    assert not prompts["validation"] & prompts["heldout"]
    assert sum(map(len, prompts.values())) == 25
    specs = [TaskSpec(name=n, metric="exact_match") for n in ("mine_search", "mine_val", "mine")]
    scorer = Scorer(specs, [str(tmp_path / "t")])
    assert set(scorer.tasks) == {"mine_search", "mine_val", "mine"}
    # the clone's script is the same program
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "split_tasks.py"),
            str(source),
            "--name",
            "mine",
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    for name in ("data/mine_search.jsonl", "data/mine_val.jsonl", "data/mine_heldout.jsonl"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()
    script_yaml = (tmp_path / "s" / "mine_search.yaml").read_text().replace(str(tmp_path / "s"), str(tmp_path / "t"))
    assert script_yaml == (tmp_path / "t" / "mine_search.yaml").read_text()  # but for the --out folder it names


def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="\n')
    assert main(["tasks", "split", str(bad), "--name", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evomerge: error: {bad}:2: not JSON") and "\n" not in err
    assert not (tmp_path / "o").exists()
