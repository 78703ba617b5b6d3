"""Fine-tunes as users have them, made from the tiny zoo with the libraries their trainers use (seconds each).

    chat = added_tokens(zoo / "add", tmp / "chat", ["<|im_start|>", "<|im_end|>"])   # tokens added, trained with them
    adapter = lora_adapter(zoo / "base", tmp / "lora_add", skill="add")              # a PEFT LoRA adapter

`added_tokens`: transformers' `tokenizer.add_special_tokens` (or `add_tokens`) and `resize_token_embeddings`, then a
few real AdamW steps on the skill's examples wrapped in the new tokens, so the new rows are trained ones (a chat
fine-tune's ChatML tokens). `lora_adapter`: peft's `get_peft_model` on the base, a few real steps (B starts at zero,
so training is what makes the delta), saved with `save_pretrained` (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path


def _examples(skill: str, seed: int, n: int = 16) -> list[tuple[str, str]]:
    from evomerge.zoo.skills import SKILLS

    rng = random.Random(f"finetune:{skill}:{seed}")
    return [(ex.prompt, ex.answer) for ex in (SKILLS[skill].sample(rng) for _ in range(n))]


def _train(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def added_tokens(
    src: Path,
    out: Path,
    tokens: Sequence[str],
    *,
    special: bool = True,
    skill: str = "add",
    steps: int = 6,
    seed: int = 0,
) -> Path:
    """`src` with `tokens` added to its tokenizer (special: as additional special tokens), its embeddings and head
    resized, and trained a few steps on `<tok0>prompt<tok-1>answer` texts."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    else:
        tokenizer.add_tokens(list(tokens))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    texts = [f"{tokens[0]}{p}{tokens[-1]}{a}" for p, a in _examples(skill, seed)]
    _train(model, tokenizer, texts, steps, 3e-3, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lora_adapter(
    base: Path,
    out: Path,
    *,
    skill: str = "add",
    r: int = 4,
    alpha: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj", "up_proj", "down_proj"),
    steps: int = 6,
    seed: int = 0,
    **options,
) -> Path:
    """A PEFT LoRA adapter of `base`, trained a few steps on `skill`'s prompt+answer texts; `options` go to
    peft's LoraConfig (use_rslora, modules_to_save, rank_pattern, ...)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **options)
    peft_model = get_peft_model(model, config)
    texts = [f"{p}{a}" for p, a in _examples(skill, seed)]
    _train(peft_model, tokenizer, texts, steps, 2e-2, seed)
    peft_model.save_pretrained(out)
    return out
