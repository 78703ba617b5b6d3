"""The trial record (evomerge/study/record.py) is the one schema of what a study stores: studies the last release
wrote read back identically through it, a resume finds the same config hash, and no other module of the package
names a user-attribute key."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import optuna
import pytest

from evomerge.candidate.baseline import BaselineLabel
from evomerge.study.record import StudyRecord, TrialRecord, trial_attrs

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
RELEASE = json.loads((DATA / "release_study.json").read_text())
RECORD_MODULE = REPO / "evomerge" / "study" / "record.py"


def _release_study():
    """The release's trials, stored in a real (in-memory) Optuna storage and read back as Optuna returns them."""
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), directions=["maximize"])
    for key, value in RELEASE["study"].items():
        study.set_user_attr(key, value)
    states = {"COMPLETE": optuna.trial.TrialState.COMPLETE, "FAIL": optuna.trial.TrialState.FAIL}
    for t in RELEASE["trials"]:
        if t["state"] == "WAITING":
            study.enqueue_trial({"weight": 0.5}, user_attrs=t["user_attrs"])
            continue
        objective = t["user_attrs"].get("objective")
        study.add_trial(
            optuna.trial.create_trial(
                state=states[t["state"]],
                params={"weight": 0.5},
                distributions={"weight": FloatDistribution(0.0, 1.0)},
                value=objective if t["state"] == "COMPLETE" else None,
                user_attrs=t["user_attrs"],
            )
        )
    return study


def test_every_trial_the_release_wrote_reads_back_identically():
    study = _release_study()
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == len(RELEASE["trials"])
    for t, written in zip(trials, RELEASE["trials"]):
        record = TrialRecord.from_trial(t)
        assert record.to_attrs() == written["user_attrs"], f"trial {t.number}"
        assert json.loads(json.dumps(record.to_attrs())) == written["user_attrs"]  # what the storage would hold


def test_the_records_fields_mean_what_the_release_wrote():
    records = [TrialRecord.from_trial(t) for t in _release_study().get_trials(deepcopy=False)]
    baselines = [r.baseline for r in records if r.baseline is not None]
    assert baselines[:3] == ["defaults", "only add", "only reverse"] and baselines[0].is_defaults
    assert [r.alone for r in records[:3]] == [None, "add", "reverse"]
    portfolio = [r for r in records if r.portfolio]
    assert portfolio and all(r.baseline.method is not None for r in portfolio)
    assert {r.baseline.method for r in portfolio} <= {"ties", "dare_ties", "della", "breadcrumbs", "slerp"}
    stopped = [r for r in records if r.stopped_early]
    assert stopped and all(not r.whole and r.examples is None for r in stopped)
    whole = [r for r in records if r.examples]
    assert all(isinstance(i, int) for r in whole for units in r.examples.values() for i in units), "ints in memory"
    refined = [r for r in records if r.refine_round is not None]
    assert refined and all(r.refined_from is not None and r.enqueued for r in refined)
    retry = records[-1]
    assert retry.retry_of is not None and retry.worker_deaths == 1 and retry.enqueued
    failed = [r for r in records if r.fail_reason]
    assert failed and failed[0].scores is None and failed[0].total_s is not None


def test_the_study_attributes_read_back_and_the_config_hash_is_unchanged(monkeypatch):
    from evomerge.config.schema import parse_config

    record = StudyRecord.from_study(_release_study())
    assert record.config == RELEASE["study"]["config"] and record.baselines_enqueued
    assert record.lock is None, "released at the end of the search"
    assert sorted(record.validation) == sorted(int(k.split(":")[1]) for k in RELEASE["study"] if ":" in k)
    # a resume parses the run's config again: the same study fields, the same hash as the release recorded
    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)
    cfg = parse_config(record.config, check_files=False)
    assert cfg.study_fields() == record.config and cfg.study_hash() == record.config_hash


HASHES = json.loads((DATA / "release_config_hashes.json").read_text())


@pytest.mark.parametrize("method", sorted(k for k in HASHES if not k.startswith("_")))
def test_each_shipped_spaces_config_hashes_as_the_release_did(method, monkeypatch):
    from evomerge.config.schema import parse_config

    monkeypatch.delenv("EVOMERGE_KERNELS", raising=False)
    case = HASHES[method]
    cfg = parse_config(case["input"], check_files=False)
    assert cfg.search_space == case["search_space"]
    assert cfg.study_hash() == case["study_hash"]


def test_partial_records_write_only_what_they_set():
    assert trial_attrs(recipe="x") == {"recipe": "x"}
    assert trial_attrs(retry_of=3, worker_deaths=0, baseline=None) == {"retry_of": 3}  # no deaths: not written
    attrs = trial_attrs(refine_round=0, examples={"a": {2: 0.5}}, stopped_early=False)
    assert attrs == {"refine_round": 0, "examples": {"a": {"2": 0.5}}}, "round 0 is kept; a False flag is not"
    assert BaselineLabel.of_method("ties") == "ties (defaults)" and BaselineLabel("ties (defaults)").method == "ties"
    assert BaselineLabel.alone("base").model == "base" and BaselineLabel.defaults().model is None


# -- no module outside the record names a user-attribute key ------------------------------------------------

_READS = {"get", "pop", "setdefault"}
_WRITES = {"set_user_attr", "set_trial_user_attr", "set_study_user_attr"}


def _is_user_attrs(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "user_attrs"


def _is_key(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def string_keyed_attrs(source: str, filename: str = "<source>") -> list[str]:
    """`line: code` of every user-attr access by a literal key: `x.user_attrs["k"]`, `x.user_attrs.get("k")`,
    `"k" in x.user_attrs`, `set_user_attr("k", ...)`, `user_attrs={"k": ...}`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        hit = False
        if isinstance(node, ast.Subscript) and _is_user_attrs(node.value) and _is_key(node.slice):
            hit = True
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr in _READS and _is_user_attrs(f.value) and node.args and _is_key(node.args[0]):
                hit = True
            elif f.attr in _WRITES and node.args and _is_key(node.args[-2] if len(node.args) > 2 else node.args[0]):
                hit = True
        elif isinstance(node, ast.Compare) and _is_key(node.left):
            hit = any(_is_user_attrs(c) for c in node.comparators)
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "user_attrs" and isinstance(kw.value, ast.Dict):
                    hit = hit or any(k is not None and _is_key(k) for k in kw.value.keys)
        if hit:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_the_grep_finds_each_form_of_a_string_keyed_access():
    code = """
a = t.user_attrs["scores"]
b = t.user_attrs.get("baseline", "")
c = "retry_of" in t.user_attrs
trial.set_user_attr("recipe", text)
storage.set_trial_user_attr(trial_id, "fail_reason", why)
study.enqueue_trial(p, user_attrs={"baseline": label})
d = t.user_attrs.get(KEY)
"""
    assert len(string_keyed_attrs(code)) == 6


def test_no_module_outside_the_record_names_a_user_attr_key():
    found = []
    for path in sorted((REPO / "evomerge").rglob("*.py")):
        if path == RECORD_MODULE:
            continue
        found += string_keyed_attrs(path.read_text(), str(path.relative_to(REPO)))
    assert found == [], "read and write user attributes through evomerge/study/record.py:\n" + "\n".join(found)
