"""Fine-tuning the real base on CPU, deterministically: a full fine-tune of some decoder layers, or a PEFT LoRA.

Each step trains on a batch that is part the specialist's own skill (cross-entropy on the answer; `own`, default
half) and part a replay of the other skills, where the specialist keeps the base's next-token distributions on the
answer positions (KL to the base): it learns its skill and neither forgets nor learns the others, so a merge has
something to find.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.zoo.real_skills import REAL_SKILLS, RealExample, RealSkill


@dataclass(frozen=True)
class RealPlan:
    skill: str
    steps: int
    lr: float
    batch: int = 8
    layers: tuple[int, int] = (0, 29)  # the decoder layers trained (a full fine-tune) or adapted (LoRA)
    lora_rank: int | None = None  # a LoRA adapter of this rank on every projection of `layers`; None: full
    own: float = 0.5  # share of each batch on the own skill; the rest replays the other skills
    warmup: int = 5


def texts(example: RealExample, skill: RealSkill, tokenizer) -> tuple[str, str]:
    """(context, continuation) as lm-eval scores them: the chat template's user turn and the answer closing the
    assistant's turn, or the plain prompt and ' answer' ending the line."""
    if skill.chat:
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
        )
        return context, example.answer + tokenizer.eos_token
    return example.prompt, " " + example.answer + "\n"


def batch_tensors(pairs: Sequence[tuple[str, str]], tokenizer):
    """input_ids, attention mask and labels (-100 but on the continuation), right-padded."""
    import torch

    ids, labels = [], []
    for context, continuation in pairs:
        c = tokenizer.encode(context, add_special_tokens=False)
        a = tokenizer.encode(continuation, add_special_tokens=False)
        ids.append(c + a)
        labels.append([-100] * len(c) + a)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask, label_t


def _token_losses(model, reference, pairs, own, tokenizer):
    """(summed loss, answer tokens) of one padded batch: cross-entropy on the own examples' answers,
    KL(reference || model) on the replayed examples' answers."""
    import torch

    input_ids, mask, labels = batch_tensors(pairs, tokenizer)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    answer = target != -100
    logp = torch.log_softmax(logits, -1)
    with torch.no_grad():
        ref = torch.log_softmax(reference(input_ids, mask)[:, :-1].float(), -1)
    ce = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kl = (ref.exp() * (ref - logp)).sum(-1)
    is_own = torch.tensor(own).unsqueeze(1).expand_as(target)
    per_token = torch.where(is_own, ce, kl)
    return (per_token * answer).sum(), answer.sum()


def _loss(model, reference, rows, tokenizer):
    """The batch's mean answer-token loss, its chat rows (~45 tokens) and plain rows (~10) in separate forwards:
    padded together, a plain row would cost as much as a chat one."""
    total = count = 0
    for chat in (False, True):
        group = [(pair, own) for pair, own, is_chat in rows if is_chat == chat]
        if group:
            loss, n = _token_losses(model, reference, [g[0] for g in group], [g[1] for g in group], tokenizer)
            total, count = total + loss, count + n
    return total / count


def _sample(plan: RealPlan, rng: random.Random, held: set[str], tokenizer):
    """A batch of (pair, own, chat): `plan.own` of it the own skill, the rest the other skills in turn (alternating
    with the own skill's rows first); never an eval prompt."""
    others = [s for s in REAL_SKILLS.values() if s.name != plan.skill]
    replayed = plan.batch - round(plan.own * plan.batch)
    rows: list[tuple[tuple[str, str], bool, bool]] = []
    while len(rows) < plan.batch:
        i = len(rows)
        skill = REAL_SKILLS[plan.skill] if i % 2 == 0 or i >= 2 * replayed else others[(i // 2) % len(others)]
        example = skill.make(rng)
        if example.prompt not in held:
            rows.append((texts(example, skill, tokenizer), skill.name == plan.skill, skill.chat))
    return rows


def train_specialist(model, reference, tokenizer, plan: RealPlan, seed: int, held: set[str], log=None) -> None:
    """Train `model`'s trainable parameters in place; `reference(input_ids, mask)` gives the base's logits."""
    import torch

    rng = random.Random(f"smol:{plan.skill}:{seed}")
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / plan.warmup) * max(0.1, 1 - s / plan.steps)
    )
    model.train()
    for step in range(plan.steps):
        loss = _loss(model, reference, _sample(plan, rng, held, tokenizer), tokenizer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log and (step % 20 == 0 or step == plan.steps - 1):
            log(f"  step {step:3d}/{plan.steps} loss {loss.item():.3f}")
    model.eval()


def freeze_but_layers(model, layers: tuple[int, int]) -> None:
    """Only decoder layers first..last train (a partial full fine-tune: backward stops below them)."""
    from evomerge.merge.layout import layer_index

    for name, p in model.named_parameters():
        index = layer_index(name)
        p.requires_grad_(index is not None and layers[0] <= index <= layers[1])


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(model, rank: int, layers: tuple[int, int], seed: int):
    """A PEFT LoRA around `model` on every projection of decoder layers first..last (B starts at zero: the adapter
    starts as the base)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        layers_to_transform=list(range(layers[0], layers[1] + 1)),
    )
    return get_peft_model(model, config)


__all__ = ["LORA_TARGETS", "RealPlan", "batch_tensors", "freeze_but_layers", "lora_model", "texts", "train_specialist"]
