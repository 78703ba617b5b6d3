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


def test_samples_print_prompts_responses_and_references(tiny_zoo, capsys):
    """--samples N: N examples per task as lm-eval scored them (the seeded subset's first ones), each with its
    prompt, the model's response and the reference from the task's data; --json carries them under `samples`."""
    args = ["eval", str(tiny_zoo / "add"), "--tasks", "zoo_add,zoo_reverse_greedy", "--limit-subset", "20"]
    assert main([*args, "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("  prompt:\n") == 4 and out.count("  response:\n") == 4 and out.count("  reference:\n") == 4
    assert out.count("zoo_add example ") == 2 and out.count("zoo_reverse_greedy example ") == 2
    assert "greedy answer: " in out  # a loglikelihood task: the reference's likelihood and whether it is greedy
    assert main([*args, "--samples", "2", "--json"]) == 0
    samples = json.loads(capsys.readouterr().out)["samples"]
    assert [s["task"] for s in samples] == ["zoo_add"] * 2 + ["zoo_reverse_greedy"] * 2
    for sample in samples:
        assert sample["prompt"] and sample["response"] and str(sample["reference"])
        assert sample["prompt"] in out and str(sample["reference"]) in out
    greedy = [s for s in samples if s["task"] == "zoo_reverse_greedy"]
    assert all(s["acc"] in (0, 1) for s in greedy)  # each example's own metric beside it


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
