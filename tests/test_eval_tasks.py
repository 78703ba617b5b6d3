"""The zoo's lm-eval task folder: shipped files are the generator's, splits are disjoint, tasks load anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.errors import TaskError
from evomerge.zoo.skills import SKILLS
from evomerge.zoo.tasks import DEFAULT_OUT, EOS, SPLITS, render_tasks, task_name, write_tasks


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_tasks_are_exactly_the_generators(tmp_path):
    write_tasks(tmp_path)
    fresh = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(DEFAULT_OUT).as_posix() for p in DEFAULT_OUT.rglob("*") if p.is_file())
    assert fresh == shipped, "eval_tasks/zoo differs from the generator: run `python -m evomerge.zoo.tasks`"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (DEFAULT_OUT / rel).read_bytes(), rel
    assert render_tasks() == render_tasks()  # deterministic


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_splits_are_disjoint_and_labelled(skill):
    prompts = {}
    for split in SPLITS:
        rows = _rows(DEFAULT_OUT / "data" / f"{skill}_{split}.jsonl")
        assert len(rows) == len(SKILLS[skill].eval_splits()[split])
        for r in rows:
            assert r["choices"][r["label"]] == r["answer"] + EOS == r["target"]
            assert len(set(r["choices"])) == len(r["choices"]) >= 2
            assert all(c.endswith(EOS) and not c[0].isspace() for c in r["choices"])
        prompts[split] = {r["prompt"] for r in rows}
        assert len(prompts[split]) == len(rows)
    assert not prompts["search"] & prompts["validation"]
    assert not prompts["search"] & prompts["heldout"]
    assert not prompts["validation"] & prompts["heldout"]
    labels = [r["label"] for r in _rows(DEFAULT_OUT / "data" / f"{skill}_heldout.jsonl")]
    assert len(set(labels)) > 1, "the answer's position must vary"


def test_every_shipped_yaml_is_indexed_with_its_metrics():
    from evomerge.scoring import TaskCatalog

    catalog = TaskCatalog()
    for path in sorted(DEFAULT_OUT.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["task"] == path.stem and cfg["task"] in catalog.names
        metrics = {m["metric"] for m in cfg["metric_list"]}
        assert metrics == ({"acc", "perplexity"} if "_greedy" in path.stem else {"acc", "acc_norm"})
    zoo = catalog.manager.task_index["zoo"]
    assert zoo.tags == {task_name(s, "heldout") for s in SKILLS}


def test_tasks_load_from_any_working_directory(tmp_path, monkeypatch):
    from evomerge.scoring import TaskCatalog

    monkeypatch.chdir(tmp_path)
    built = TaskCatalog().build("zoo_greedy_val")
    assert sorted(built) == sorted(task_name(s, "validation", greedy=True) for s in SKILLS)
    task = built["zoo_add_greedy_val"]
    assert len(task.eval_docs) == len(SKILLS["add"].eval_splits()["validation"])
    assert task.doc_to_target(task.eval_docs[0]).endswith(EOS)


def test_user_task_folder_with_relative_data_files(tmp_path, monkeypatch):
    from evomerge.scoring import TaskCatalog

    folder = tmp_path / "mytasks"
    (folder / "rows").mkdir(parents=True)
    (folder / "rows" / "t.jsonl").write_text(
        "".join(json.dumps({"q": f"{i}+0=", "a": str(i)}) + "\n" for i in range(7))
    )
    (folder / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: rows/t.jsonl\n"
        'test_split: test\noutput_type: loglikelihood\ndoc_to_text: q\ndoc_to_target: a\ntarget_delimiter: ""\n'
    )
    monkeypatch.chdir(tmp_path.parent)
    task = TaskCatalog([folder]).build("mine")["mine"]
    assert [d["a"] for d in task.eval_docs] == [str(i) for i in range(7)]


def test_builtin_index_is_built_only_when_a_task_is_not_in_the_folders():
    """`include_defaults`: lm-eval's ~30 s index of its own tasks is built on the first name the folders lack, so a
    process whose tasks are all local never pays for it."""
    from evomerge.scoring.tasks import TaskCatalog

    catalog = TaskCatalog(include_defaults=True)
    assert set(catalog.build("zoo_add_search")) == {"zoo_add_search"}
    assert catalog.manager is catalog._local  # not indexed
    with pytest.raises(TaskError):
        catalog.build("no_such_task_anywhere")
    assert catalog.manager is not catalog._local and "arc_easy" in catalog.manager.task_index
