"""Checkpoint: lazy mapped reads (single, sharded, any dtype), pickles only on request, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import ModelError
from evomerge.io.checkpoint import Checkpoint, check_compatible
from evomerge.io.shards import ShardWriter

VOCAB = {"<pad>": 0, "a": 1, "b": 2}


def make_model(path: Path, tensors: dict[str, torch.Tensor], *, vocab=VOCAB, arch="LlamaForCausalLM") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"architectures": [arch], "model_type": "llama", "num_hidden_layers": 2})
    )
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel(vocab, unk_token="<pad>")).save(str(path / "tokenizer.json"))  # a file as HF tools write it
    save_file(tensors, str(path / "model.safetensors"))
    return path


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(3, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
        "position_ids": torch.arange(5),
    }


def test_reads_every_tensor_lazily_and_exactly(tmp_path):
    ref = tensors()
    ckpt = Checkpoint(make_model(tmp_path / "m", ref))
    assert sorted(ckpt.tensor_names()) == sorted(ref)
    for name, t in ref.items():
        assert ckpt.shape(name) == tuple(t.shape) and ckpt.dtype(name) == t.dtype
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert ckpt.num_layers == 2 and ckpt.architecture == "LlamaForCausalLM" and ckpt.vocab() == VOCAB
    with pytest.raises(ModelError, match="has no tensor 'nope'"):
        ckpt.get("nope")


def test_sha256_matches_the_zoo_manifest(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    for name in ("base", "add"):
        assert Checkpoint(tiny_zoo / name).sha256() == manifest["sha256"][name]


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    ref = tensors()
    folder = tmp_path / "sharded"
    folder.mkdir()
    writer = ShardWriter(folder, [(n, t.shape) for n, t in ref.items()], shard_bytes=100)  # forces several shards
    for name, t in ref.items():
        writer.add(name, t)
    shards = writer.finish()
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    (folder / "config.json").write_text(json.dumps({"architectures": ["X"], "model_type": "x"}))
    ckpt = Checkpoint(folder)
    assert len(ckpt.files) == len(shards)
    for name, t in ref.items():
        assert torch.equal(ckpt.get(name), t)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)


def test_pickle_needs_allow_pickle(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    ref = tensors()
    torch.save(ref, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-pickle"):
        Checkpoint(folder)
    ckpt = Checkpoint(folder, allow_pickle=True)
    assert all(torch.equal(ckpt.get(n), t) for n, t in ref.items())


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    good = make_model(tmp_path / "good", tensors())
    data = (good / "model.safetensors").read_bytes()
    bad = make_model(tmp_path / "bad", tensors())
    (bad / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ModelError, match=r"bad/model\.safetensors: corrupt safetensors header"):
        Checkpoint(bad)
    short = make_model(tmp_path / "short", tensors())
    (short / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelError, match=r"short/model\.safetensors: truncated"):
        Checkpoint(short)
    (short / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(ModelError, match="corrupt"):
        Checkpoint(short)


def test_missing_folder_config_or_weights(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        Checkpoint(tmp_path / "empty")


def test_check_compatible_names_the_first_mismatch(tmp_path):
    a = Checkpoint(make_model(tmp_path / "a", tensors(0)))
    check_compatible([a, Checkpoint(make_model(tmp_path / "ok", tensors(1)))])

    t = tensors(1)
    del t["model.norm.weight"]
    with pytest.raises(ModelError, match="tensor model.norm.weight is missing"):
        check_compatible([a, Checkpoint(make_model(tmp_path / "missing", t))])
    t = tensors(1)
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 5)
    with pytest.raises(ModelError, match=r"up_proj.weight has shape \[8, 5\]"):
        check_compatible([a, Checkpoint(make_model(tmp_path / "shape", t))])
    with pytest.raises(ModelError, match="tokenizer vocabulary differs"):
        check_compatible(
            [a, Checkpoint(make_model(tmp_path / "vocab", tensors(1), vocab={"<pad>": 0, "a": 2, "b": 1}))]
        )
    with pytest.raises(ModelError, match="architecture"):
        check_compatible([a, Checkpoint(make_model(tmp_path / "arch", tensors(1), arch="GPT2LMHeadModel"))])


def test_released_tensors_read_back_from_the_file(tmp_path):
    """export drops each tensor's mapped pages once merged; a view handed out earlier still reads right."""
    ref = {"big": torch.arange(300_000, dtype=torch.float32), "small": torch.ones(3)}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    writer = ShardWriter(folder, [(n, t.shape) for n, t in ref.items()])
    for name, t in ref.items():
        writer.add(name, t)
    writer.finish()
    (folder / "config.json").write_text(json.dumps({"architectures": ["X"], "model_type": "x"}))
    ckpt = Checkpoint(folder)
    view = ckpt.get("big")
    assert float(view.sum()) == float(ref["big"].sum())
    ckpt.release("big")
    ckpt.release("small")
    assert torch.equal(view, ref["big"]) and torch.equal(ckpt.get("big"), ref["big"])
    assert torch.equal(ckpt.get("small"), ref["small"])


def test_streamed_shards_are_plain_safetensors(tmp_path):
    """The header room reserved up front is padded with spaces; safetensors and transformers read it."""
    from safetensors import safe_open

    ref = tensors()
    writer = ShardWriter(tmp_path, [(n, t.shape) for n, t in ref.items()])
    for name, t in ref.items():
        writer.add(name, t)
    (path,) = writer.finish()
    with safe_open(str(path), "pt") as fh:
        assert set(fh.keys()) == set(ref) and fh.metadata() == {"format": "pt"}
        for name, t in ref.items():
            assert torch.equal(fh.get_tensor(name), t)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header % 8 == 0
