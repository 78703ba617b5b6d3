"""docs/inputs.md's examples run as written (every `bash` block, in order, in a fresh folder: tests/docpages.py):
added tokens merged with tokenizer_source and by mergekit-yaml, an audit of differing vocabularies, LoRA adapters
made with peft merged in both forms, a search over them exported and merged again by mergekit-yaml, the new methods,
a subspace merge (evomerge-only),
and recipes from elsewhere (the tokenizer: block, chat_template, truncation, DARE under --kernels mergekit).
"""

from __future__ import annotations

import json

import pytest
import torch
from docpages import REPO, run_blocks, user_folder
from safetensors.torch import load_file

PAGE = REPO / "docs" / "inputs.md"


def _tensors(folder):
    return load_file(folder / "model.safetensors")


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~2-5 min; tests/test_vocab.py and tests/test_lora.py check the same behaviour in the fast suite
def test_inputs_page_runs_as_written(tmp_path):
    home, env = user_folder(tmp_path)
    outputs = run_blocks(PAGE, home, env)
    text = "\n".join(outputs)
    assert "47" in text.split() and "the vocabularies differ" in text  # the union's size, the audit's report
    assert json.loads((home / "chat-merged" / "config.json").read_text())["vocab_size"] == 47
    assert _same(_tensors(home / "chat-merged"), _tensors(home / "chat-mergekit"))  # the page's claim
    assert _same(_tensors(home / "lora-merged"), _tensors(home / "lora-mergekit"))  # no magnitude ties here
    assert _same(_tensors(home / "runs" / "lora" / "best" / "model"), _tensors(home / "lora-exported"))
    assert (home / "sce-merged" / "model.safetensors").is_file() and (
        home / "nearswap-merged" / "recipe.yaml"
    ).is_file()
    assert (home / "iso-merged" / "model.safetensors").is_file() and "# evomerge-only: merge_method iso_cts" in text
    # recipes from elsewhere: the tokenizer: block, chat_template and an unread `t` as mergekit merges them
    assert _same(_tensors(home / "wild-merged"), _tensors(home / "wild-mergekit"))
    assert json.loads((home / "wild-merged" / "config.json").read_text())["vocab_size"] == 64  # 47 padded to 64
    assert "<|im_start|>" in (home / "wild-merged" / "chat_template.jinja").read_text()
    assert "t: 0.3" not in (home / "wild-merged" / "recipe.yaml").read_text()
    assert _tensors(home / "truncated")["model.embed_tokens.weight"].shape[0] == 45  # the base's rows
    assert _same(_tensors(home / "dare-merged"), _tensors(home / "dare-mergekit"))  # mergekit's masks, bit for bit
