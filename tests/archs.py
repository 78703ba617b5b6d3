"""Tiny random checkpoints of real architectures, built from transformers' own config classes (seconds each).

    paths = build_family("gpt2", tmp_path)    # {"base": ..., "a": ..., "b": ...}: a base and two fine-tunes of it

Every model uses the zoo's character tokenizer (45 tokens), so the zoo's lm-eval tasks score them. The fine-tunes
are the base plus small seeded noise on every tensor: task vectors that differ in every layer and kind.
"""

from __future__ import annotations

import json
from pathlib import Path

# name -> (config class, its arguments): 3 layers, hidden 32, four heads (two KV heads where the architecture has GQA)
SHAPES = {
    "llama": (
        "LlamaConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    ),  # q/k/v biases
    "mistral": (
        "MistralConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
        ),
    ),  # tied embeddings: no lm_head stored
    "phi3": (
        "Phi3Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            original_max_position_embeddings=64,
        ),
    ),  # fused qkv_proj, gate_up_proj
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64)),  # transformer.h.N, Conv1D, tied
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
    ),  # gpt_neox.layers.N, fused query_key_value, embed_out
}
ARCHS = tuple(SHAPES)
# The filter that names attention tensors in each architecture (what a space's `self_attn` kind becomes)
ATTN = {"gpt2": "attn", "gpt_neox": ".attention."}  # not `attention`: post_attention_layernorm has it


def build(arch: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialized `arch` model (seeded) with the zoo tokenizer, saved as safetensors."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    cls_name, shape = SHAPES[arch]
    config = (
        getattr(transformers, cls_name)(
            vocab_size=len(tokenizer),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=64,
            **shape,
        )
        if arch != "gpt2"
        else transformers.GPT2Config(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def fine_tune(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """`base` plus seeded Gaussian noise of std `scale` on every tensor, in a copy of its folder."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    tensors = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {k: (t + scale * torch.randn(t.shape, generator=generator)).contiguous() for k, t in tensors.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def build_family(arch: str, root: Path) -> dict[str, Path]:
    """base + fine-tunes a and b under root/arch/."""
    folder = root / arch
    base = build(arch, folder / "base")
    return {"base": base, "a": fine_tune(base, folder / "a", 1), "b": fine_tune(base, folder / "b", 2)}


def edit_config(src: Path, out: Path, **fields) -> Path:
    """A copy of model folder `src` whose config.json has `fields` changed (tensors untouched)."""
    import shutil

    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config.update(fields)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
