"""Deterministic CPU training of the zoo's tiny causal LMs (answer-only loss on skill examples).

A model is built from a `transformers` config class (`ARCHITECTURES`): Llama (the default), Qwen2 (grouped-query
attention, q/k/v biases) or GPT-2 (learned positions, LayerNorm, a GELU MLP, fused Conv1D attention), with or
without tied input and output embeddings, so the family holds more than one architecture.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from evomerge.zoo.skills import SKILLS, Example


# architecture -> transformers config class; every one takes Llama-style size arguments
ARCHITECTURES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gpt2": "GPT2Config"}


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 64
    layers: int = 6
    heads: int = 4
    intermediate: int = 192
    max_positions: int = 64
    arch: str = "llama"  # a key of ARCHITECTURES
    kv_heads: int | None = None  # key/value heads (grouped-query attention when fewer than `heads`); None: `heads`
    tied: bool = False  # output head tied to the input embeddings (one stored tensor)


@dataclass(frozen=True)
class TrainPlan:
    skills: tuple[str, ...]
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 20
    layers: tuple[int, int] | None = None  # train only decoder layers first..last (None: every weight)
    # Replay by distillation: examples of skills other than `own` train the model to keep the reference model's
    # (the base's) next-token distributions on them (KL), instead of the right answers: a fine-tune that keeps
    # what the base could do elsewhere, neither forgetting it nor learning more of it.
    own: str | None = None
    kl_replay: bool = False


def make_model(shape: ModelShape, tokenizer, seed: int):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=shape.tied,
    )
    if shape.arch == "gpt2":  # learned positions, LayerNorm, GELU MLP, Conv1D weights (transposed)
        config = transformers.GPT2Config(
            n_embd=shape.hidden,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_inner=shape.intermediate,
            n_positions=shape.max_positions,
            resid_pdrop=0.0,  # no dropout: a zoo model trains and scores deterministically, as the Llama ones
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
    else:
        config = getattr(transformers, ARCHITECTURES[shape.arch])(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads,
            max_position_embeddings=shape.max_positions,
            rms_norm_eps=1e-5,
            **special,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
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


def _trainable(name: str, layers: tuple[int, int] | None) -> bool:
    if layers is None:
        return True
    from evomerge.merge.layout import layer_index

    index = layer_index(name)
    return index is not None and layers[0] <= index <= layers[1]


def _distill_loss(model, reference, examples: list[Example], own: list[bool], tokenizer):
    """Cross-entropy on the answers of `own` examples, KL(reference || model) on the answer positions of the others."""
    import torch

    input_ids, mask, labels = _batch(examples, tokenizer)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    answer = target != -100
    logp = torch.log_softmax(logits, -1)
    with torch.no_grad():
        ref = torch.log_softmax(reference(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float(), -1)
    ce = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kl = (ref.exp() * (ref - logp)).sum(-1)
    is_own = torch.tensor(own).unsqueeze(1).expand_as(target)
    per_token = torch.where(is_own, ce, kl)
    return (per_token * answer).sum() / answer.sum()


def train(model, tokenizer, plan: TrainPlan, seed: int, eval_prompts: set[str], log=None, reference=None) -> None:
    """Train in place on a uniform mixture of `plan.skills`, never on an eval prompt (`reference`: the model
    whose outputs a `kl_replay` plan keeps on the skills other than its own)."""
    import torch

    rng = random.Random(f"train:{seed}:{','.join(plan.skills)}:{plan.steps}")
    torch.manual_seed(seed)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(_trainable(name, plan.layers))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / plan.warmup) * max(0.05, 1 - s / plan.steps)
    )
    skills = [SKILLS[s] for s in plan.skills]
    model.train()
    for step in range(plan.steps):
        batch: list[Example] = []
        own: list[bool] = []
        while len(batch) < plan.batch:
            skill = rng.choice(skills)
            ex = skill.sample(rng)
            if ex.prompt not in eval_prompts:
                batch.append(ex)
                own.append(skill.name == plan.own)
        if plan.kl_replay:
            loss = _distill_loss(model, reference, batch, own, tokenizer)
        else:
            input_ids, mask, labels = _batch(batch, tokenizer)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == plan.steps - 1):
            log(f"  step {step:4d}/{plan.steps} loss {loss.item():.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
