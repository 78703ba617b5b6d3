"""The demo zoo: deterministic, loadable with transformers, never trained on eval prompts."""
from __future__ import annotations

import json
import random

import pytest

from evomerge.zoo.build import build_zoo, eval_prompts, weights_sha256
from evomerge.zoo.skills import SKILLS


def test_same_seed_same_weights(tiny_zoo, tmp_path):
    import torch

    from evomerge.io.checkpoint import Checkpoint

    assert not torch.are_deterministic_algorithms_enabled()
    again = build_zoo(tmp_path / "again", seed=0, size="tiny", log=None)
    assert not torch.are_deterministic_algorithms_enabled(), "the build's deterministic mode leaked into the process"
    first = json.loads((tiny_zoo / "zoo.json").read_text())
    assert again["sha256"] == first["sha256"]
    assert set(first["sha256"]) == {"base", "add", "reverse"}
    assert len(set(first["sha256"].values())) == 3  # the specialists really moved away from the base
    # zoo.json records what every recipe's provenance records for the model (Checkpoint.sha256)
    assert weights_sha256(tiny_zoo / "add") == first["sha256"]["add"] == Checkpoint(tiny_zoo / "add").sha256()

    # rebuilt in place: the new zoo is swapped in whole, no temp folder stays behind
    rebuilt = build_zoo(tmp_path / "again", seed=1, size="tiny", log=None)
    assert json.loads((tmp_path / "again" / "zoo.json").read_text()) == rebuilt and rebuilt["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_refuses_to_replace_a_folder_that_is_not_a_zoo(tmp_path):
    from evomerge.errors import EvomergeError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EvomergeError, match="is not a zoo"):
        build_zoo(tmp_path / "mine", size="tiny", log=None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_checkpoints_load_offline_with_transformers(tiny_zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo / "base", local_files_only=True)
    assert tok.decode(tok.encode("47+8=55", add_special_tokens=False)) == "47+8=55"
    for name in ("base", "add", "reverse"):
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo / name, local_files_only=True)
        assert model.config.model_type == "llama"
        ids = torch.tensor([tok.encode("rev abcde=", add_special_tokens=False)])
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_eval_splits_are_disjoint_and_excluded_from_training(monkeypatch):
    from evomerge.zoo import train as training
    from evomerge.zoo.build import specialist
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import ModelShape, make_model

    held = eval_prompts()
    for skill in SKILLS.values():
        splits = skill.eval_splits()
        prompts = [set(ex.prompt for ex in rows) for rows in splits.values()]
        assert sum(map(len, prompts)) == len(set().union(*prompts))
        for rows in splits.values():
            assert all(ex.answer not in ex.distractors for ex in rows)
    # the guard is needed: the add skill's generator draws eval prompts all the time
    rng = random.Random(0)
    drawn = [SKILLS["add"].sample(rng) for _ in range(2000)]
    assert any(ex.prompt in held for ex in drawn)
    # ... and training skips them: every batch train() feeds the model, recorded
    fed = []
    real = training._batch
    monkeypatch.setattr(training, "_batch", lambda examples, tok: (fed.extend(examples), real(examples, tok))[1])
    tokenizer = build_tokenizer()
    model = make_model(ModelShape(hidden=16, layers=1, heads=2, intermediate=16), tokenizer, seed=0)
    plan = specialist("add", steps=20, batch=64)
    training.train(model, tokenizer, plan, seed=0, eval_prompts=held)
    assert len(fed) == 20 * 64
    assert {ex.prompt for ex in fed if "+" in ex.prompt} and not {ex.prompt for ex in fed} & held


def test_unknown_size_is_a_user_error(tmp_path):
    from evomerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", "--out", str(tmp_path / "z"), "--size", "huge"])
    assert exc.value.code == 2
    assert not (tmp_path / "z").exists()
