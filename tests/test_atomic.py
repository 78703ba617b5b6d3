"""Outputs under kills: the destination holds the previous complete checkpoint or nothing, never a partial one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_input import small_disk

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.export.export import export_recipe
from evomerge.io import atomic
from evomerge.io.atomic import atomic_dir, clean_stale
from evomerge.io.shards import parse_size
from evomerge.io.verify import verify_checkpoint
from evomerge.merge.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent


def _recipe(zoo: Path, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        f"merge_method: dare_ties\nbase_model: {zoo}/base\nmodels:\n- model: {zoo}/add\n- model: {zoo}/reverse\n"
        "parameters: {weight: 0.5, density: 0.5}\n"
    )
    return path


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _kill_when(cmd: list[str], out: Path, ready) -> bool:
    """Start `cmd`, SIGKILL it as soon as `ready(tmp_folder)` holds; True if it was killed mid-write."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            tmps = [out.parent / n for n in _siblings(out) if atomic.TMP_TAG in n]
            if any(ready(t) for t in tmps):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _parts(n: int):
    return lambda tmp: sum(1 for p in _listdir(tmp) if p.endswith(".safetensors")) >= n


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _cmd(recipe: Path, out: Path, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "evomerge",
        "merge",
        str(recipe),
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--max-shard-size",
        "1",
    ]  # one tensor per shard: ~40 files, a write long enough to kill in the middle


def test_sigkill_mid_write_keeps_the_previous_result(tiny_zoo, tmp_path):
    recipe = _recipe(tiny_zoo, tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--out", str(out), "--seed", "1"]) == 0
    previous = verify_checkpoint(out)
    assert _kill_when(_cmd(recipe, out, 2), out, _parts(5))
    assert _siblings(out)  # the killed run's temp folder stayed behind: the kill was mid-write
    assert verify_checkpoint(out) == previous and Recipe.load(out / "recipe.yaml").seed == 1
    # leftovers never break the next run, which removes them
    assert main(["merge", str(recipe), "--out", str(out), "--seed", "3"]) == 0
    assert Recipe.load(out / "recipe.yaml").seed == 3 and verify_checkpoint(out)
    assert _siblings(out) == []


@pytest.mark.slow
def test_sigkill_at_many_points_leaves_a_whole_result_or_nothing(tiny_zoo, tmp_path):
    recipe = _recipe(tiny_zoo, tmp_path)
    out = tmp_path / "out"
    # no previous result: a killed first run leaves nothing at `out`
    assert _kill_when(_cmd(recipe, out, 1), out, lambda tmp: True)
    assert not out.exists()
    assert main(["merge", str(recipe), "--out", str(out), "--seed", "1", "--max-shard-size", "1"]) == 0
    previous = verify_checkpoint(out)
    seen = set()
    for ready in (_parts(1), _parts(20), _parts(39), lambda tmp: "recipe.yaml" in _listdir(tmp)):
        # late points may miss (the run finished), or land after the swap (the temp name then holds the old result)
        _kill_when(_cmd(recipe, out, 2), out, ready)
        checked = verify_checkpoint(out)  # whole, always
        seen.add("previous" if checked == previous else Recipe.load(out / "recipe.yaml").seed)
    assert seen <= {"previous", 2}
    assert "previous" in seen, "no kill landed mid-write: the test proved nothing"
    assert main(["merge", str(recipe), "--out", str(out), "--seed", "3"]) == 0
    assert verify_checkpoint(out) and _siblings(out) == []


def test_stale_siblings_are_removed_and_an_orphaned_previous_result_comes_back(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.{atomic.TMP_TAG}-{dead}-abc"
    live = tmp_path / f".out.{atomic.TMP_TAG}-{alive}-def"
    other = tmp_path / f".other.{atomic.TMP_TAG}-{dead}-ghi"
    orphan = tmp_path / f".out.{atomic.OLD_TAG}-{dead}-jkl"
    for folder in (stale, live, other, orphan / "out"):
        folder.mkdir(parents=True)
    (orphan / "out" / "recipe.yaml").write_text("previous")
    # killed between "move the old result aside" and "move the new one in": target missing
    assert sorted(p.name for p in clean_stale(out)) == sorted([stale.name, orphan.name])
    assert (out / "recipe.yaml").read_text() == "previous"
    assert live.is_dir() and other.is_dir()  # a live run's folder, and another target's, are left alone


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_replaces_whole_and_cleans_up(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "deep" / "out"
    with atomic_dir(out) as tmp:
        (tmp / "recipe.yaml").write_text("evomerge: {outputs: {x: one}}")
    with atomic_dir(out) as tmp:
        assert not out.joinpath("two").exists()
        (tmp / "recipe.yaml").write_text("evomerge: {outputs: {x: two}}")
        (tmp / "two").write_text("")
    assert "two" in (out / "recipe.yaml").read_text() and sorted(os.listdir(out)) == ["recipe.yaml", "two"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's owner-only 0o700
    assert _siblings(out) == []
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "recipe.yaml").write_text("three")
        raise RuntimeError("merge failed")
    assert "two" in (out / "recipe.yaml").read_text() and _siblings(out) == []


def test_failed_write_removes_the_folders_it_created(tiny_zoo, tmp_path):
    r = Recipe.load(_recipe(tiny_zoo, tmp_path))
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(EvomergeError, match="free disk space"):
        with small_disk():  # a real failed write (EFBIG past 16 KiB), in the first shard
            export_recipe(r, out)
    assert not (tmp_path / "a").exists()


def test_refuses_to_replace_a_folder_that_is_not_an_evomerge_output(tiny_zoo, tmp_path):
    """`evomerge merge recipe.yaml --out .` (or `--out ~`) must never delete the user's files."""
    (tmp_path / "notes.txt").write_text("keep me")
    recipe = _recipe(tiny_zoo, tmp_path)  # the user's own recipe.yaml is no evomerge output
    with pytest.raises(EvomergeError, match="not an evomerge output"):
        export_recipe(Recipe.load(recipe), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    r = Recipe.load(recipe)
    (tmp_path / "empty").mkdir()
    assert verify_checkpoint(export_recipe(r, tmp_path / "empty"))  # an empty folder is fine


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("64KiB") == 65536 and parse_size("1") == 1
    assert parse_size("1.5 mb") == 1_500_000
