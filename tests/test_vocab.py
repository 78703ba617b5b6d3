"""Vocabularies that differ (added tokens): `tokenizer_source: union | base | MODEL` as mergekit 0.1.5 merges them.

The oracle is mergekit's own merge (`run_merge`, what `mergekit-yaml` runs) of the same recipe, tokenizer included:
tensors equal bit for bit, the written tokenizers equal (tokenizer.json, vocabulary, added tokens). The fine-tune
with added tokens is real: transformers' add_special_tokens + resize_token_embeddings and a few AdamW steps
(tests/finetunes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from finetunes import added_tokens
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge.recipe import Recipe
from evomerge.merge.vocab import Vocab, align_rows, plan_vocab

CHAT = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def vocab_zoo(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """The tiny zoo plus `chat` (add with two special tokens) and `chat2` (reverse with <|im_end|> and <sep>)."""
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": tiny_zoo / "base",
        "reverse": tiny_zoo / "reverse",
        "chat": added_tokens(tiny_zoo / "add", root / "chat", CHAT, skill="add"),
        "chat2": added_tokens(tiny_zoo / "reverse", root / "chat2", ["<|im_end|>", "<sep>"], skill="reverse", seed=1),
    }


def _recipe(zoo: dict[str, Path], models: list[str], source: str | None, method: str = "task_arithmetic") -> dict:
    data = {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[m]), "parameters": {"weight": 0.6 - 0.2 * i}} for i, m in enumerate(models)],
        "dtype": "float32",
    }
    if source is not None:
        data["tokenizer_source"] = str(zoo[source]) if source in zoo else source
    return data


def _mergekit(recipe: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(
        MergeConfiguration.model_validate(recipe), str(out), options=MergeOptions(write_model_card=False, quiet=True)
    )
    return out


def _ours(recipe: dict, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), "--out", str(tmp_path / "ours")]) == 0
    return tmp_path / "ours"


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("source", ["union", "base", "chat"])
def test_merge_equals_mergekit_tensors_and_tokenizer(vocab_zoo, tmp_path, source, capsys):
    recipe = _recipe(vocab_zoo, ["chat", "reverse"], source)
    ours, theirs = _ours(recipe, tmp_path), _mergekit(recipe, tmp_path / "theirs")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(b)
    for name in b:
        assert torch.equal(a[name], b[name]), name
    rows = 45 if source == "base" else 47
    assert (
        a["model.embed_tokens.weight"].shape[0] == rows == json.loads((ours / "config.json").read_text())["vocab_size"]
    )
    assert json.loads((ours / "tokenizer.json").read_text()) == json.loads((theirs / "tokenizer.json").read_text())
    tok, ref = _tokenizer(ours), _tokenizer(theirs)
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == rows
    assert {i: str(t) for i, t in tok.added_tokens_decoder.items()} == {
        i: str(t) for i, t in ref.added_tokens_decoder.items()
    }
    text = "<|im_start|>12+34=<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    if source != "base":  # only chat has its new tokens: base and reverse take chat's trained rows, so the merge does
        new = tok.convert_tokens_to_ids("<|im_start|>")
        chat = load_file(vocab_zoo["chat"] / "model.safetensors")["model.embed_tokens.weight"]
        assert new == 45 and torch.equal(a["model.embed_tokens.weight"][new], chat[45])
        assert not torch.equal(chat[45], chat[44])


def test_a_token_two_models_added_is_their_mean_for_the_base(vocab_zoo, tmp_path):
    """<|im_end|> is in chat and chat2, not in the base: the base's row for it is the mean of theirs (mergekit's
    rule), compared with mergekit's merge token by token (mergekit orders the union by a hash of its set of models,
    so the two outputs may number the added tokens differently)."""
    recipe = _recipe(vocab_zoo, ["chat", "chat2"], "union", method="linear")
    recipe["models"].append({"model": str(vocab_zoo["base"]), "parameters": {"weight": 0.3}})
    ours, theirs = _ours(recipe, tmp_path), _mergekit(recipe, tmp_path / "theirs")
    tok, ref = _tokenizer(ours), _tokenizer(theirs)
    assert (
        set(tok.get_vocab())
        == set(ref.get_vocab())
        == set(_tokenizer(vocab_zoo["base"]).get_vocab())
        | {
            "<|im_start|>",
            "<|im_end|>",
            "<sep>",
        }
    )
    assert [tok.convert_ids_to_tokens(i) for i in (45, 46, 47)] == ["<|im_start|>", "<|im_end|>", "<sep>"]
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token, i in tok.get_vocab().items():
            assert torch.equal(a[name][i], b[name][ref.convert_tokens_to_ids(token)]), (name, token)
    for name in set(a) - {"model.embed_tokens.weight", "lm_head.weight"}:
        assert torch.equal(a[name], b[name]), name


def test_align_rows_follows_mergekits_rules():
    """Own row where present; else the only model that has it, the base's, the mean of the others', or zero."""
    e = [torch.tensor([[1.0], [2.0]]), torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[100.0], [300.0]])]
    maps = [(0, 1, -1, -1, -1), (0, 1, 2, -1, -1), (0, -1, 1, 1, -1)]  # tokens: shared, b-less, two-have, one-has, none
    out = align_rows(e, maps, base=0)
    assert out[0].flatten().tolist() == [1.0, 2.0, 165.0, 300.0, 0.0]  # token 2: mean of 30 and 300 (base lacks it)
    assert out[1].flatten().tolist() == [10.0, 20.0, 30.0, 300.0, 0.0]
    assert out[2].flatten().tolist() == [100.0, 2.0, 300.0, 300.0, 0.0]  # token 1: the base's (it has it)
    no_base = align_rows(e, maps, base=None)
    assert no_base[2].flatten().tolist()[1] == 11.0  # token 1 in models 0 and 1, no base: their mean


def test_union_adds_main_vocabulary_tokens_then_added_ones_in_input_order():
    base = Vocab(tokens={"a": 0, "b": 1}, rows=2)
    one = Vocab(tokens={"a": 0, "b": 1, "c": 2, "<x>": 3}, added={"<x>": _spec("<x>")}, rows=4)
    two = Vocab(tokens={"a": 0, "d": 1, "<x>": 2, "<y>": 3}, added={"<x>": _spec("<x>"), "<y>": _spec("<y>")}, rows=4)
    plan = plan_vocab("union", "base", {"base": base, "one": one, "two": two})
    assert plan.tokens == {"a": 0, "b": 1, "c": 2, "d": 3, "<x>": 4, "<y>": 5}
    assert plan.maps["two"] == (0, -1, -1, 1, 2, 3) and plan.added_to("base") == ["c", "d", "<x>", "<y>"]
    assert plan_vocab("base", "base", {"base": base, "one": one}).tokens == {"a": 0, "b": 1}


def _spec(content: str):
    from evomerge.merge.vocab import AddedSpec

    return AddedSpec(content=content, special=True, normalized=False)


def test_without_tokenizer_source_other_vocabularies_exit_2_naming_the_fix(vocab_zoo, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(vocab_zoo, ["chat", "reverse"], None)))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err
    assert str(vocab_zoo["chat"]) in err and "vocab_size is 47" in err and "tokenizer_source: union" in err
    assert not (tmp_path / "out").exists()


def test_audit_reports_the_difference_instead_of_refusing(vocab_zoo, tmp_path, capsys):
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump(
            {"base_model": str(vocab_zoo["base"]), "models": [str(vocab_zoo["chat"]), str(vocab_zoo["reverse"])]}
        )
    )
    assert main(["audit", str(config)]) == 0
    out = capsys.readouterr().out
    assert "the vocabularies differ" in out and "chat: adds 2 token(s) ('<|im_start|>', '<|im_end|>')" in out
    assert main(["audit", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocabulary"] == [
        "chat: adds 2 token(s) ('<|im_start|>', '<|im_end|>'); has 47 embedding rows (base: 45)"
    ]
    embed = next(g for g in report["groups"] if g["row"] == "embed" and g["kind"] == "all")
    assert embed["n_params"] == 45 * 32 and embed["magnitude_per_model"][0] > 0  # over the base's 45 tokens


def test_search_takes_the_output_vocabulary(vocab_zoo, tmp_path, monkeypatch):
    """A search config's tokenizer_source: the resident model has the union's rows, every trial scores, and the
    export is the union merge `evomerge merge` gives for the trial's recipe."""
    from evomerge.config.schema import parse_config
    from evomerge.export.export import export_trial
    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        {
            "name": "vocab",
            "base_model": str(vocab_zoo["base"]),
            "models": [str(vocab_zoo["chat"]), str(vocab_zoo["reverse"])],
            "method": "task_arithmetic",
            "tokenizer_source": "union",
            "tasks": {"search": [{"name": "zoo_add_search", "subset": 8}]},
            "budget": {"n_trials": 4},
            "workers": {"count": 0},
            "refine": {"at": [0.5], "steps": 2, "every": 1},
            "portfolio": False,
        }
    )
    result = run_search(cfg, progress=False, log=None)
    assert result.n_complete == 4 and result.n_failed == 0
    res = export_trial(cfg.run_dir, log=None)
    recipe = Recipe.load(res.recipe)
    assert recipe.tokenizer_source == "union"
    tensors = load_file(res.model_dir / "model.safetensors")
    assert tensors["lm_head.weight"].shape == (47, 32) and len(_tokenizer(res.model_dir)) == 47
    assert main(["merge", str(res.recipe), "--out", str(tmp_path / "again")]) == 0
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_a_tied_head_and_a_slices_recipe_are_laid_out_too(vocab_zoo, arch_family, tmp_path):
    """GPT-2 ties its head to the embeddings (one stored tensor); a `slices:` recipe takes the embeddings from its
    first slice's sources and the head from its last: both equal mergekit's merge under union."""
    family = arch_family("gpt2")
    chat = added_tokens(family["a"], tmp_path / "gpt2_chat", CHAT, steps=2)
    tied = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(chat), "parameters": {"weight": 0.5}},
            {"model": str(family["b"]), "parameters": {"weight": 0.5}},
        ],
        "tokenizer_source": "union",
    }
    base, add = str(vocab_zoo["base"]), str(vocab_zoo["chat"])
    sliced = {
        "merge_method": "slerp",
        "base_model": base,
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": add, "layer_range": [0, 2]}]},
            {"sources": [{"model": base, "layer_range": [2, 4]}, {"model": add, "layer_range": [2, 4]}]},
        ],
        "parameters": {"t": [0.2, 0.8]},
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    for name, recipe in (("tied", tied), ("sliced", sliced)):
        (tmp_path / name).mkdir()
        ours = _ours(recipe, tmp_path / name)
        theirs = _mergekit(recipe, tmp_path / name / "theirs")
        a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b), name
        assert json.loads((ours / "config.json").read_text())["vocab_size"] == 47


def test_audit_reports_tokens_numbered_otherwise(vocab_zoo, tmp_path, capsys):
    """Same tokens, two of them swapped: a merge without tokenizer_source refuses it; audit says which."""
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(vocab_zoo["reverse"], swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump({"base_model": str(vocab_zoo["base"]), "models": [str(swapped), str(vocab_zoo["chat"])]})
    )
    assert main(["audit", str(config), "--json"]) == 0
    lines = json.loads(capsys.readouterr().out)["vocabulary"]
    assert lines[0] == f"swapped: numbers 2 token(s) otherwise ({a!r}, {b!r})" and lines[1].startswith("chat: adds 2")
