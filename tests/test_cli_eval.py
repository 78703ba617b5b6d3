"""`evomerge eval`: table and JSON on the tiny zoo; bad inputs exit 2 with one line naming the fix."""

from __future__ import annotations

import json
import shutil

from evomerge.cli import main


def test_table_and_json(tiny_zoo, capsys):
    args = ["eval", str(tiny_zoo / "add"), "--tasks", "zoo_add,zoo_reverse_greedy", "--limit-subset", "20"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    rows = {tuple(line.split()[:2]): float(line.split()[2]) for line in lines[2:]}
    assert set(rows) == {
        ("zoo_add", "acc"),
        ("zoo_add", "acc_norm"),
        ("zoo_reverse_greedy", "acc"),
        ("zoo_reverse_greedy", "perplexity"),
    }
    assert 0.0 <= rows[("zoo_add", "acc")] <= 1.0

    assert main([*args, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["zoo_add"]["acc"] == rows[("zoo_add", "acc")]  # 20 examples: 4-decimal table is exact
    assert set(scores) == {"zoo_add", "zoo_reverse_greedy"}


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: ")
    return lines[0]


def test_missing_model_dir(tmp_path, capsys):
    msg = _error(capsys, ["eval", str(tmp_path / "nope"), "--tasks", "zoo_add"])
    assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_model_dir_without_tokenizer(tiny_zoo, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_zoo / "base" / f, bare / f)
    msg = _error(capsys, ["eval", str(bare), "--tasks", "zoo_add"])
    assert f"{bare} has no tokenizer" in msg and "save_pretrained" in msg


def test_unknown_task(tiny_zoo, capsys):
    msg = _error(capsys, ["eval", str(tiny_zoo / "base"), "--tasks", "zoo_add,zoo_revrse"])
    assert "unknown task 'zoo_revrse'" in msg and "did you mean: zoo_reverse" in msg and "--include-path" in msg


def test_missing_include_path(tiny_zoo, tmp_path, capsys):
    msg = _error(capsys, ["eval", str(tiny_zoo / "base"), "--tasks", "zoo_add", "--include-path", str(tmp_path / "x")])
    assert f"task folder {tmp_path / 'x'} does not exist" in msg
