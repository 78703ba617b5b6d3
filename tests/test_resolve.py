"""The config resolved once (evomerge/config/resolve.py): `evomerge audit CONFIG --plan` and `evomerge search CONFIG`
print the same notes and the same resource plan, because both plan the one resolved config; a default written out in the
file resolves as the default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_capacity import LLAMA_0_25B, sparse_llama

from evomerge.config.resolve import asked, resolve_config
from evomerge.config.schema import parse_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def sparse_models(tiny_zoo, tmp_path_factory) -> Path:
    """A base and two fine-tunes of 0.5 GB each (sparse files: the plan reads headers only)."""
    root = tmp_path_factory.mktemp("sparse-resolve")
    for name in ("base", "a", "b"):
        sparse_llama(root / name, LLAMA_0_25B, tiny_zoo / "base")
    return root


def _too_many_workers() -> int:
    """More workers than this machine's memory holds: both commands print the plan and exit 2 before any model
    loads or Ray starts (the search's refusal comes right after its plan)."""
    from evomerge.capacity import local_devices

    return int(local_devices().nodes[0].host_available / 0.5e9) + 10


def _ties_without_validation(root: Path, tmp: Path) -> Path:
    data = {
        "name": "plan",
        "base_model": str(root / "base"),
        "models": [str(root / "a"), str(root / "b")],
        "method": "ties",
        "tasks": {"search": [{"name": "zoo_add_greedy_search", "subset": 20}]},
        "budget": {"n_trials": 100},  # four refinement rounds: tensor, tensor, rows, distill
        "workers": {"count": _too_many_workers()},
    }
    path = tmp / "ties.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _demo_copy(root: Path, tmp: Path, ties: bool) -> Path:
    """configs/demo.yaml as a user copies it (every default written out), over the sparse models; with `ties`, the
    method changed and the validation block removed (its per-row rounds then fall back, as the default's do)."""
    text = DEMO.read_text()
    text = text.replace("../zoo/base", str(root / "base")).replace(
        "[../zoo/add, ../zoo/reverse]", f"[{root / 'a'}, {root / 'b'}]"
    )
    text = text.replace("  count: 1 ", f"  count: {_too_many_workers()} ")
    if ties:
        text = text.replace("method: task_arithmetic", "method: ties").replace(
            "search_space: task_arithmetic", "search_space: ties"
        )
        text = re.sub(r"\nvalidation:.*?\n\n", "\n\n", text, flags=re.S)
    path = tmp / "demo.yaml"
    path.write_text(text)
    return path


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (the tasks' index is built once per process: seconds, not a minute per command):
    exit code, stdout, stderr."""
    from evomerge.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


TIMED = (
    "plan: time per trial on ",
    " trials per hour with ",
    "plan: export first validates ",
    "plan: the portfolio's default merges, each ",  # the subspace merges' SVDs, at this machine's probe
    "'s SVDs on ",
)


def _plan_of(stdout: str) -> list[str]:
    """The notes and the plan's memory lines, the node's free memory (which moves between two processes) left out;
    the time lines come from a probe of this machine's speed at that moment (present in both, checked apart)."""
    lines = [line for line in stdout.splitlines() if line.startswith("plan:") or " is off for this study: " in line]
    lines = [line for line in lines if not any(mark in line for mark in TIMED)]
    return [re.sub(r"[\d.]+ [MG]B of ([\d.]+ [MG]B) available", r"X of \1 available", line) for line in lines]


@pytest.mark.parametrize("case", ["ties without validation", "demo copy", "demo copy, ties without validation"])
def test_audit_plan_and_search_print_the_same_plan(sparse_models, tmp_path, monkeypatch, capsys, case):
    if case == "ties without validation":
        config = _ties_without_validation(sparse_models, tmp_path)
    else:
        config = _demo_copy(sparse_models, tmp_path, ties="ties" in case)
    monkeypatch.chdir(tmp_path)
    audit = _run(capsys, "audit", config.name, "--plan")
    search = _run(capsys, "search", config.name, "--no-progress")
    assert audit[0] == search[0] == 2, (audit, search)
    # the same refusal (the room left for workers moves with the machine's free memory between the two runs)
    assert audit[2].split(", but")[0] == search[2].split(", but")[0]
    assert audit[2].startswith(f"evomerge: error: {config.name}: workers.count: ")
    plan = _plan_of(audit[1])
    assert len([line for line in plan if line.startswith("plan:")]) >= 3 and "does NOT fit" in plan[-1]
    for out in (audit[1], search[1]):  # the time plan, from the same quantities, in both
        assert all(any(mark in line for line in out.splitlines()) for mark in TIMED[:2]), out
    assert plan == _plan_of(search[1])
    fell_back = any(line.startswith("per-row refinement") for line in plan)
    assert fell_back == ("ties" in case)  # ties without the guard: per-tensor rounds, and no per-row TIES memory
    cfg = resolve_config(parse_config(yaml.safe_load(config.read_text()), str(config), config.parent)).config
    assert set(cfg.refine.arms) == ({"tensor"} if "ties" in case else {"tensor", "rows", "distill"})
    assert not (tmp_path / "runs").exists()


def test_a_default_written_out_is_still_the_default(tiny_zoo, tmp_path):
    """configs/demo.yaml writes the default `refine` and `early_stop` out: asked for they are not, so a copy falls
    back where a config leaving them out does; a value other than the default is asked for."""
    data = yaml.safe_load(DEMO.read_text())
    data.update(base_model=str(tiny_zoo / "base"), models=[str(tiny_zoo / "add"), str(tiny_zoo / "reverse")])
    cfg = parse_config(data, "demo copy", tmp_path)
    assert "refine" in cfg.model_fields_set and "arms" in cfg.refine.model_fields_set
    assert not asked(cfg, "refine") and not asked(cfg, "refine.arms") and not asked(cfg, "early_stop")
    rows = parse_config({**data, "refine": {**data["refine"], "arms": ["rows"]}}, "demo copy", tmp_path)
    assert asked(rows, "refine") and asked(rows, "refine.arms")
    staged = parse_config({**data, "early_stop": {"stages": [0.5], "z": 2.0}}, "demo copy", tmp_path)
    assert asked(staged, "early_stop") and not asked(staged, "refine")
