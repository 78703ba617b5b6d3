"""The demo zoo: deterministic, loadable with transformers, never trained on eval prompts."""
from __future__ import annotations

import json
import random

import pytest

from evomerge.zoo.build import build_zoo, eval_prompts, weights_sha256
from evomerge.zoo.skills import SKILLS


def test_same_seed_same_weights(tiny_zoo, tmp_path):
    again = build_zoo(tmp_path / "again", seed=0, size="tiny", log=None)
    first = json.loads((tiny_zoo / "zoo.json").read_text())
    assert again["sha256"] == first["sha256"]
    assert set(first["sha256"]) == {"base", "add", "reverse"}
    assert len(set(first["sha256"].values())) == 3  # the specialists really moved away from the base
    assert weights_sha256(tiny_zoo / "add") == first["sha256"]["add"]


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


def test_eval_splits_are_disjoint_and_excluded_from_training():
    held = eval_prompts()
    for skill in SKILLS.values():
        splits = skill.eval_splits()
        prompts = [set(ex.prompt for ex in rows) for rows in splits.values()]
        assert sum(map(len, prompts)) == len(set().union(*prompts))
        for rows in splits.values():
            assert all(ex.answer not in ex.distractors for ex in rows)
    # the trainer's sampler skips these: draw training examples the way train() does and check
    rng = random.Random(0)
    drawn = [SKILLS["add"].sample(rng) for _ in range(2000)]
    assert any(ex.prompt in held for ex in drawn)  # the guard is needed: the spaces overlap


def test_unknown_size_is_a_user_error(tmp_path):
    from evomerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", "--out", str(tmp_path / "z"), "--size", "huge"])
    assert exc.value.code == 2
    assert not (tmp_path / "z").exists()
