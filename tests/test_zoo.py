"""The demo zoo: deterministic, loadable with transformers, never trained on eval prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import ModelShape, make_model
    from evomerge.zoo.variants import VARIANTS, Specialist

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
    plan = VARIANTS["classic"].plan(Specialist("add", steps=20))
    training.train(model, tokenizer, plan, seed=0, eval_prompts=held)
    assert len(fed) == 20 * plan.batch
    assert {ex.prompt for ex in fed if "+" in ex.prompt} and not {ex.prompt for ex in fed} & held


def test_unknown_size_is_a_user_error(tmp_path):
    from evomerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", "--out", str(tmp_path / "z"), "--size", "huge"])
    assert exc.value.code == 2
    assert not (tmp_path / "z").exists()


def test_the_build_does_not_depend_on_the_callers_thread_count(tiny_zoo, tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = build_zoo(tmp_path / "two", seed=0, size="tiny", log=None)
        assert torch.get_num_threads() == 2  # the build's own setting does not leak
    finally:
        torch.set_num_threads(before)
    assert again["sha256"] == json.loads((tiny_zoo / "zoo.json").read_text())["sha256"]


def test_every_shipped_variant_is_a_family_member():
    from evomerge.zoo.variants import DEFAULT_VARIANT, VARIANTS

    assert DEFAULT_VARIANT in VARIANTS
    for name, v in VARIANTS.items():
        assert v.name == name and 2 <= len(v.specialists) <= 4 and len(set(v.skills)) == len(v.skills)
        assert set(v.skills) | set(v.base_mix) <= set(SKILLS)
        for s in v.specialists:
            plan = v.plan(s)
            assert plan.own == s.skill and plan.skills.count(s.skill) >= 4  # half its own skill, half replay


def test_variant_overrides_and_their_errors():
    from evomerge.errors import ConfigError
    from evomerge.zoo.variants import get_variant

    v = get_variant("pair", skills=["sub", "dup", "cipher"], layers=3, hidden=48, steps=7)
    assert v.skills == ["sub", "dup", "cipher"] and v.shape.layers == 3 and v.shape.hidden == 48
    assert {s.steps for s in v.specialists} == {7} and v.kl_replay
    for kwargs, message in [
        ({"skills": ["add"]}, "2 to 4 different skills"),
        ({"skills": ["ad", "dup"]}, "did you mean: add"),
        ({"layers": 0}, "1 to 48"),
        ({"hidden": 30}, "multiple of the 4"),
    ]:
        with pytest.raises(ConfigError, match=message):
            get_variant("pair", **kwargs)
    with pytest.raises(ConfigError, match="no such zoo variant"):
        get_variant("pairs")


def test_distilled_replay_keeps_the_base_where_answer_replay_teaches(tmp_path):
    """A specialist that replays the right answers learns the base's other skills further; one that replays the base's
    own distributions (kl_replay) stays near the base there, so the skills stay each specialist's own."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import ModelShape
    from evomerge.zoo.variants import Specialist, ZooVariant

    def build(kl: bool) -> Path:
        v = ZooVariant(
            "t",
            "t",
            (Specialist("reverse", steps=40), Specialist("dup", steps=40)),
            shape=ModelShape(hidden=32, layers=2, heads=2, intermediate=64),
            base_mix=("copy", "sort", "add"),
            base_steps=60,
            batch=16,
            kl_replay=kl,
        )
        out = tmp_path / f"kl{int(kl)}"
        build_zoo(out, seed=0, variant=v, log=None)
        return out

    tok = build_tokenizer()
    rng = random.Random(3)
    prompts = [SKILLS["add"].sample(rng) for _ in range(32)]
    ids = torch.tensor([tok.encode(p.prompt + p.answer, add_special_tokens=False)[:8] for p in prompts])

    def drift(zoo: Path) -> float:
        logp = {
            n: torch.log_softmax(AutoModelForCausalLM.from_pretrained(zoo / n)(ids).logits, -1)
            for n in ("base", "reverse")
        }
        return float((logp["base"].exp() * (logp["base"] - logp["reverse"])).sum(-1).mean())

    assert drift(build(kl=True)) < 0.5 * drift(build(kl=False))


def test_zoo_build_takes_a_variant_and_its_overrides(tmp_path, capsys):
    from evomerge.cli import main

    out = tmp_path / "z"
    assert (
        main(
            [
                "zoo",
                "build",
                "--variant",
                "tiny",
                "--skills",
                "add,dup",
                "--steps",
                "3",
                "--layers",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    manifest = json.loads((out / "zoo.json").read_text())
    assert manifest["variant"] == "tiny" and list(manifest["specialists"]) == ["add", "dup"]
    assert manifest["shape"]["layers"] == 2 and {t["steps"] for t in manifest["training"].values()} == {3}
    assert "zoo tiny written to" in capsys.readouterr().out
    assert main(["zoo", "build", "--variant", "tiny", "--size", "tiny", "--out", str(tmp_path / "y")]) == 2
    assert "--size is the older name of --variant" in capsys.readouterr().err and not (tmp_path / "y").exists()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_zoo_models_of_other_architectures(arch, tmp_path):
    """The zoo builds Qwen2 (grouped-query attention, tied embeddings) and GPT-2 models from their own config
    classes; saved and loaded by transformers they are the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import ModelShape, make_model

    tok = build_tokenizer()
    shape = ModelShape(hidden=32, layers=2, heads=4, intermediate=64, arch=arch, kv_heads=2, tied=True)
    model = make_model(shape, tok, seed=0).eval()
    assert model.config.model_type == arch and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if arch == "qwen2":
        assert model.config.num_key_value_heads == 2 and model.model.layers[0].self_attn.k_proj.out_features == 16
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tok.encode("rev abcde=", add_special_tokens=False)])
    torch.testing.assert_close(model(ids).logits, again(ids).logits)


def test_a_plain_variant_replays_nothing():
    from evomerge.zoo.variants import VARIANTS

    plain = VARIANTS["plain"]
    assert plain.replay_kind == "none" and VARIANTS["pair"].replay_kind == "distilled"
    for s in plain.specialists:
        assert set(plain.plan(s).skills) == {s.skill}  # its own skill only: it forgets what it does not train
    assert plain.base_plan() == VARIANTS["pair"].base_plan()  # pair's base: only the fine-tuning differs
