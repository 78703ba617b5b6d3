"""The exported folder as others get it: its model card (Hugging Face metadata, held-out scores and caveats, the
recipe it embeds), Hub ids in place of local paths, and files another user can read."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from test_report import search

from evomerge.cli import main
from evomerge.export.modelcard import TAGS, embedded_recipe

HUB = {"base": "me/tiny-base", "add": "me/tiny-add", "reverse": "me/tiny-rev"}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tiny_zoo, tmp_path_factory) -> Path:
    """A 5-trial TIES study (in this process)."""
    return search(
        tmp_path_factory.mktemp("card"), tiny_zoo, "card", "ties", {"name": "cmaes", "options": {"popsize": 4}}, 5
    )


def _card(folder: Path) -> tuple[dict, str]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "model" / "README.md")  # as the Hub reads it
    return card.data.to_dict(), card.text


def test_card_without_a_report_has_metadata_search_scores_and_the_exact_recipe(run, tiny_zoo, tmp_path):
    code, out, _ = _run(["export", str(run), "--out", str(tmp_path / "plain")])
    assert code == 0 and "the model card has no held-out scores: run `evomerge report" in out
    meta, text = _card(tmp_path / "plain")
    assert meta["library_name"] == "transformers" and meta["tags"] == TAGS and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta, "a local path is not Hub metadata"
    assert "No held-out scores" in text and "## Search scores" in text and "--hub-id" in text
    # the embedded recipe is recipe.yaml, less only the outputs' sha256 (the card's own among them)
    recipe = yaml.safe_load((tmp_path / "plain" / "recipe.yaml").read_text())
    embedded = yaml.safe_load(embedded_recipe((tmp_path / "plain" / "model" / "README.md").read_text()))
    assert recipe["evomerge"].pop("outputs") and embedded == recipe
    assert embedded["evomerge"]["inputs"] and embedded["models"], "inputs and their sha256 are in the card"


def test_card_after_the_report_has_heldout_scores_and_caveats(run, tmp_path):
    from evomerge.report.compare import Comparison

    assert _run(["report", str(run), "--limit-subset", "60"])[0] == 0
    c = Comparison.model_validate_json((run / "report" / "comparison.json").read_text())
    code, out, _ = _run(["export", str(run), "--out", str(tmp_path / "held")])
    assert code == 0 and "no held-out scores" not in out
    _, text = _card(tmp_path / "held")
    evolved = c.row("evolved (best trial)")
    assert "## Held-out scores" in text and f"| **this merge** | {evolved.scores['zoo_add']:.4f} |" in text
    drops = c.drops()
    for task, source, d in drops:  # every skill lost against its best source, beyond noise, is named
        assert f"**Caveat:** on `{task}`" in text and f"for {source.name} alone, {d.points()} ({d.se_text()})" in text
    if not drops:
        assert "No task is below its best source model by more than noise" in text
    # an export of another trial does not borrow the report's held-out scores
    other = next(t.number for t in c.trials if t.number != c.best_trial)
    code, out, _ = _run(["export", str(run), "--trial", str(other), "--out", str(tmp_path / "other")])
    assert code == 0 and "No held-out scores" in _card(tmp_path / "other")[1]


def test_a_caveat_names_a_lost_skill():
    """The card's caveat where the merge scores below a source by more than noise (addition 99% -> 81%)."""
    from test_report import _comparison, _examples

    from evomerge.export.modelcard import heldout_section

    n = 300
    ex = {
        "x": {"a": _examples(0.8, n), "b": _examples(0.3, n)},
        "y": {"a": _examples(0.3, n), "b": _examples(0.7, n)},
        "base": {"a": _examples(0.2, n), "b": _examples(0.2, n)},
        "evolved (best trial)": {"a": _examples(0.6, n), "b": _examples(0.6, n)},
    }
    text = "\n".join(heldout_section(_comparison(0.6, 0.5, ex)))
    assert "**Caveat:** on `a` this merge scores 0.6000 against 0.8000 for x alone, -20.0 points (paired SE" in text
    assert "on `b`" in text  # 0.6 against y's 0.7: -10 points, beyond noise too


def test_hub_ids_name_the_inputs_and_keep_their_sha256(run, tiny_zoo, tmp_path):
    from evomerge.io.checkpoint import Checkpoint

    out = tmp_path / "hub"
    flags = [x for name, hub in HUB.items() for x in ("--hub-id", f"{tiny_zoo / name}={hub}")]
    code, _, err = _run(["export", str(run), "--out", str(out), *flags])
    assert code == 0, err
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["base_model"] == HUB["base"] and [m["model"] for m in recipe["models"]] == [
        HUB["add"],
        HUB["reverse"],
    ]
    assert recipe["evomerge"]["inputs"] == {hub: Checkpoint(tiny_zoo / name).sha256() for name, hub in HUB.items()}
    meta, text = _card(out)
    assert set(meta["base_model"]) == set(HUB.values()) and str(tiny_zoo) not in text, "no local path in the card"
    assert main(["verify", str(out)]) == 0

    # merging the published recipe where those ids are no local folders says what to do, exit 2
    code, _, err = _run(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "again")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "again").exists()
    assert f"{HUB['add']} is not a local folder" in err and f"hf download {HUB['add']} --local-dir DIR" in err
    # ...and once they are (a download, here a copy, next to the recipe), it reproduces the checkpoint
    for name, hub in HUB.items():
        shutil.copytree(tiny_zoo / name, out / hub)
    assert _run(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "again")])[0] == 0
    same = [p.name for p in (out / "model").glob("*.safetensors")]
    assert same and all((out / "model" / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in same)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("nowhere=me/x", "nowhere is not an input of study 'card'"),
        ("{zoo}/add=not-a-hub-id", "'not-a-hub-id' is not a Hub id; write it as org/name"),
        ("{zoo}/add", "write LOCAL=org/name"),
    ],
)
def test_bad_hub_ids_exit_2_naming_the_fix(run, tiny_zoo, tmp_path, flag, message):
    code, _, err = _run(["export", str(run), "--out", str(tmp_path / "x"), "--hub-id", flag.format(zoo=tiny_zoo)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_outputs_are_readable_by_other_users(run, tiny_zoo):
    """Folders 0755, files 0644 under umask 022 (as `save_pretrained` writes them): the export, the zoo; and another
    user reads every exported file."""
    old = os.umask(0o022)
    try:
        shared = Path(tempfile.mkdtemp(prefix="evomerge-modes-"))
        shared.chmod(0o755)  # mkdtemp is owner-only; the test's own parent folder must let others in
        assert _run(["export", str(run), "--out", str(shared / "best")])[0] == 0
    finally:
        os.umask(old)
    try:
        for folder in (shared / "best", tiny_zoo):
            modes = _modes(folder)
            for name, mode in modes.items():
                path = folder / name
                assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
        assert "model/model.safetensors" in _modes(shared / "best")
        if os.geteuid() == 0 and shutil.which("runuser"):  # as another user: nobody
            files = [str(p) for p in (shared / "best").rglob("*") if p.is_file()]
            out = subprocess.run(["runuser", "-u", "nobody", "--", "sha256sum", *files], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert len(out.stdout.splitlines()) == len(files)
    finally:
        shutil.rmtree(shared)
