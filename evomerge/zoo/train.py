"""Deterministic CPU training of the zoo's tiny Llama models (answer-only loss on skill examples)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from evomerge.zoo.skills import SKILLS, Example


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 64
    layers: int = 6
    heads: int = 4
    intermediate: int = 192
    max_positions: int = 64


@dataclass(frozen=True)
class TrainPlan:
    skills: tuple[str, ...]
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 20


def make_model(shape: ModelShape, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()


def _batch(examples: list[Example], tokenizer):
    import torch

    ids, labels = [], []
    for ex in examples:
        p = tokenizer.encode(ex.prompt, add_special_tokens=False)
        a = tokenizer.encode(ex.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask, label_t


def train(model, tokenizer, plan: TrainPlan, seed: int, eval_prompts: set[str], log=None) -> None:
    """Train in place on a uniform mixture of `plan.skills`, never on an eval prompt."""
    import torch

    rng = random.Random(f"train:{seed}:{','.join(plan.skills)}:{plan.steps}")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / plan.warmup) * max(0.05, 1 - s / plan.steps)
    )
    skills = [SKILLS[s] for s in plan.skills]
    model.train()
    for step in range(plan.steps):
        batch: list[Example] = []
        while len(batch) < plan.batch:
            ex = rng.choice(skills).sample(rng)
            if ex.prompt not in eval_prompts:
                batch.append(ex)
        input_ids, mask, labels = _batch(batch, tokenizer)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == plan.steps - 1):
            log(f"  step {step:4d}/{plan.steps} loss {loss.item():.3f}")
    model.eval()
