"""mergekit's own test configurations, merged by `mergekit-yaml` (the reference) and by `evomerge merge`.

    models = build_models(tmp_path / "models", ["model_a", "model_b", "tok_chatml"])   # the fixtures' tiny models
    case = load_cases()["chat_template_chatml"]
    result = run_case(case, tmp_path / "models", tmp_path / "out")                     # both merges, compared
    assert result.equal, result.differences

The tiny input models are rebuilt with the shapes mergekit's test fixtures give them (`tests/common.py`,
`test_tokenizer.py`, `test_embedding_truncation.py`, `test_vocabulary_axis.py`, `test_whisper_merges.py` in
arcee-ai/mergekit), each from its own seed so a run is reproducible. The configurations are written out as YAML in
tests/data/mergekit_suite/cases.yaml, with model folder names relative to the models folder.

A case runs `mergekit-yaml RECIPE OUT --random-seed 0` (plus its `mergekit_flags`) and `evomerge merge RECIPE --out
OUT` (plus its `evomerge_flags`), then compares the weights (names, dtypes, values, bit for bit), config.json (less
the fields each writer stamps: transformers_version) and the tokenizer (vocabulary, added tokens and their settings,
special tokens, chat template).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CASES = Path(__file__).parent / "data" / "mergekit_suite" / "cases.yaml"
MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")
EVOMERGE = str(Path(sys.executable).parent / "evomerge")


# ---- the tiny models -----------------------------------------------------------------------------------------
def _save(model, path: Path) -> None:
    model.save_pretrained(str(path), safe_serialization=True)


def picollama(path: Path, seed: int, vocab_size: int = 64) -> None:
    """A 2-layer Llama: hidden 32, MLP 48, 16 heads (mergekit's `make_picollama`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    _save(LlamaForCausalLM(config), path)


def picogranite(path: Path, seed: int) -> None:
    """A 2-layer Granite: hidden 32, MLP 48, 2 heads, 2 key-value heads (mergekit's `make_picogranite`)."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    config = GraniteConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    _save(GraniteForCausalLM(config), path)


def gpt2_shaped(path: Path, seed: int) -> None:
    """GPT-2's depth (12 layers, 12 heads, GPT-2's vocabulary and context) at width 48 instead of 768: mergekit's
    `make_gpt2size` is 124M parameters, far too many for a test; the configurations exercise the depth."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_ctx=1024, n_embd=48, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257)
    _save(GPT2LMHeadModel(config), path)


def pico_llava(path: Path, seed: int) -> None:
    """A LLaVA: a 2-layer CLIP vision tower (32 px, patch 4, width 64) and a picollama text model
    (mergekit's `make_picoLlaVa`)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128
    )
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
    _save(LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)), path)


def pico_phi(path: Path, seed: int, vocab_size: int, swapped: bool = False) -> None:
    """A 1-layer Phi (hidden 32, MLP 64, 4 heads) whose head bias counts 0, 1, 2, ... with a tokenizer of its
    vocabulary size; `swapped`: that tokenizer's ids of `_tok_3` and `_tok_4` exchanged (test_vocabulary_axis)."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = PhiForCausalLM(config)
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.arange(vocab_size, dtype=torch.float32))
    _save(model, path)
    bpe_tokenizer(vocab_size).save_pretrained(str(path))
    if swapped:
        data = json.loads((path / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        vocab["_tok_3"], vocab["_tok_4"] = vocab["_tok_4"], vocab["_tok_3"]
        (path / "tokenizer.json").write_text(json.dumps(data))


def mini_whisper(path: Path, seed: int) -> None:
    """A Whisper with 2 encoder and 2 decoder layers at width 32 (test_whisper_merges' `make_mini_whisper`)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        encoder_ffn_dim=64,
        decoder_start_token_id=1,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        suppress_tokens=[],
    )
    _save(WhisperForConditionalGeneration(config), path)


def bpe_tokenizer(vocab_size: int, added: Iterable[str] = ()):
    """A Llama fast tokenizer over `<unk>`, `<s>`, `</s>`, `_tok_3`, ... (`vocab_size` tokens, no merges), with
    `added` added as plain added tokens (test_tokenizer's `make_tokenizer`)."""
    import tempfile

    import tokenizers
    from transformers import LlamaTokenizerFast

    words = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    spec = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": {w: i for i, w in enumerate(words)}, "merges": []},
        "added_tokens": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        file = os.path.join(folder, "tokenizer.json")
        tokenizers.Tokenizer.from_str(json.dumps(spec)).save(file)
        tokenizer = LlamaTokenizerFast(tokenizer_file=file)
    tokenizer.add_tokens(list(added))
    return tokenizer


def _with_tokenizer(vocab_rows: int, tokens: int, added: Iterable[str] = ()) -> Callable[[Path, int], None]:
    def build(path: Path, seed: int) -> None:
        picollama(path, seed, vocab_rows)
        bpe_tokenizer(tokens, added).save_pretrained(str(path))

    return build


def _mixed_precision(path: Path, seed: int) -> None:
    """A picollama stored in bfloat16 but for its float32 norms (test_merge_dtypes)."""
    from safetensors.torch import load_file, save_file

    picollama(path, seed)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({k: t if "norm" in k else t.bfloat16() for k, t in tensors.items()}, str(file), metadata={"format": "pt"})


def _eos_past_small(path: Path, seed: int) -> None:
    """The truncation tests' larger model (10 rows, a 10-token tokenizer) with eos 9 and a generation config that
    names token 9."""
    _with_tokenizer(10, 10)(path, seed)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = 9
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9], "sequence_bias": [[[9], 1.0]]}))


def _short_head(path: Path, seed: int) -> None:
    """An 8-row picollama (8-token tokenizer) whose head keeps 7 rows (test_embedding_truncation)."""
    from safetensors.torch import load_file, save_file

    _with_tokenizer(8, 8)(path, seed)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:7].clone()
    save_file(tensors, str(file), metadata={"format": "pt"})


def _pickled(path: Path, seed: int) -> None:
    """A picollama stored as pytorch_model.bin (a pickle), as older checkpoints are."""
    import torch
    from safetensors.torch import load_file

    picollama(path, seed)
    tensors = load_file(str(path / "model.safetensors"))
    torch.save(tensors, str(path / "pytorch_model.bin"))
    (path / "model.safetensors").unlink()


BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "model_a": picollama,
    "model_b": picollama,
    "model_c": picollama,
    "granite_a": picogranite,
    "granite_b": picogranite,
    "gpt2_like": gpt2_shaped,
    "vlm_a": pico_llava,
    "vlm_b": pico_llava,
    "vlm_c": pico_llava,
    "tok_base": _with_tokenizer(64, 64),
    "tok_chatml": _with_tokenizer(66, 64, ["<|im_start|>", "<|im_end|>"]),
    "tok_padded": _with_tokenizer(64, 64, [f"<UNUSED_{i}>" for i in range(4)]),
    "mixed_bf16": _mixed_precision,
    "mixed_f32": picollama,
    "trunc_small": _with_tokenizer(8, 8),
    "trunc_large": _with_tokenizer(10, 8),
    "trunc_large10": _with_tokenizer(10, 10),
    "trunc_large_eos": _eos_past_small,
    "trunc_short_head": _short_head,
    "bare_small": lambda path, seed: picollama(path, seed, 8),
    "bare_large": lambda path, seed: picollama(path, seed, 10),
    "phi_base": lambda path, seed: pico_phi(path, seed, 8),
    "phi_swapped8": lambda path, seed: pico_phi(path, seed, 8, swapped=True),
    "phi_swapped10": lambda path, seed: pico_phi(path, seed, 10, swapped=True),
    "phi_large": lambda path, seed: pico_phi(path, seed, 10),
    "whisper_a": mini_whisper,
    "whisper_b": mini_whisper,
    "pickled_a": _pickled,
}


def build_models(folder: Path, names: Iterable[str]) -> Path:
    """Each named model built once into `folder/NAME` (seeded by its position in BUILDERS); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(BUILDERS)
    for name in names:
        if not (folder / name / "config.json").is_file():
            tmp = folder / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            BUILDERS[name](tmp, order.index(name))
            tmp.rename(folder / name)
    return folder


# ---- the configurations --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One configuration of mergekit's suite: its recipe, the flags each tool takes, and what is expected."""

    name: str
    family: str
    recipe: dict
    mergekit_flags: tuple[str, ...] = ()
    evomerge_flags: tuple[str, ...] = ()
    expect: str = "equal"  # equal | both_refuse | mergekit_broken
    reason: str = ""


def load_cases() -> dict[str, Case]:
    data = yaml.safe_load(CASES.read_text())
    out = {}
    for name, entry in data.items():
        out[name] = Case(
            name=name,
            family=entry["family"],
            recipe=entry["recipe"],
            mergekit_flags=tuple(entry.get("mergekit_flags", [])),
            evomerge_flags=tuple(entry.get("evomerge_flags", [])),
            expect=entry.get("expect", "equal"),
            reason=entry.get("reason", ""),
        )
    return out


def recipe_models(recipe: Any) -> set[str]:
    """Every string in the recipe that names a model builder."""
    if isinstance(recipe, dict):
        return set().union(*(recipe_models(v) for v in recipe.values())) if recipe else set()
    if isinstance(recipe, list):
        return set().union(*(recipe_models(v) for v in recipe)) if recipe else set()
    if isinstance(recipe, str):
        return {part for part in recipe.split("+") if part in BUILDERS}
    return set()


# ---- running and comparing ------------------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    mergekit_rc: int
    evomerge_rc: int
    differences: list[str] = field(default_factory=list)
    evomerge_stderr: str = ""
    mergekit_stderr: str = ""

    @property
    def equal(self) -> bool:
        return self.mergekit_rc == 0 and self.evomerge_rc == 0 and not self.differences


def run_case(case: Case, models: Path, out: Path, in_process: bool = False) -> Result:
    """Both merges of `case` (models already built under `models`), compared; outputs under `out`. By the two
    command lines, or with `in_process` by what they run once their flags are parsed (`mergekit.merge.run_merge`
    with mergekit-yaml's options, `evomerge.cli.main`): the same merges without two interpreters' start-up."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = models / f"{case.name}.yaml"
    recipe.write_text(yaml.safe_dump(case.recipe, sort_keys=False))
    reference, ours = out / "mergekit", out / "evomerge"
    run = _run_in_process if in_process else _run_commands
    (mk_rc, mk_err), (ev_rc, ev_err) = run(case, recipe, reference, ours)
    result = Result(case.name, mk_rc, ev_rc, evomerge_stderr=ev_err, mergekit_stderr=mk_err)
    if mk_rc == 0 and ev_rc == 0:
        result.differences = compare_outputs(reference, ours)
    return result


def _run_commands(case: Case, recipe: Path, reference: Path, ours: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    mk = subprocess.run(
        [MERGEKIT_YAML, recipe.name, str(reference), "--random-seed", "0", "--no-write-model-card", "--quiet"]
        + list(case.mergekit_flags),
        cwd=recipe.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ev = subprocess.run(
        [EVOMERGE, "merge", str(recipe), "--out", str(ours), *case.evomerge_flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return (mk.returncode, mk.stderr), (ev.returncode, ev.stderr)


MERGEKIT_FLAGS = {  # mergekit-yaml's flags the cases use -> its MergeOptions fields
    "--unsafe-truncate-embeddings": ("unsafe_truncate_embeddings", True),
    "--no-copy-tokenizer": ("copy_tokenizer", False),
    "--allow-crimes": ("allow_crimes", True),
}


def _run_in_process(case: Case, recipe: Path, reference: Path, ours: Path):
    import contextlib
    import io
    import traceback

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from evomerge.cli import main

    options = dict(MERGEKIT_FLAGS[flag] for flag in case.mergekit_flags)
    cwd = os.getcwd()
    try:
        os.chdir(recipe.parent)  # mergekit-yaml resolves model names against the working folder
        config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
        run_merge(config, str(reference), MergeOptions(random_seed=0, write_model_card=False, quiet=True, **options))
        mk = (0, "")
    except Exception:  # noqa: BLE001 - mergekit refuses with many kinds of exception
        mk = (1, traceback.format_exc(limit=1))
    finally:
        os.chdir(cwd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["merge", str(recipe), "--out", str(ours), *case.evomerge_flags])
        except SystemExit as exc:  # argparse: a flag evomerge does not have
            code = int(exc.code or 0)
        except Exception:  # noqa: BLE001 - a bug: exit 1 with its traceback
            code, _ = 1, err.write(traceback.format_exc())
    return mk, (code, err.getvalue())


def compare_outputs(reference: Path, ours: Path) -> list[str]:
    """Every way the two checkpoints differ: weights, config.json, tokenizer (empty: the same model)."""
    return _compare_weights(reference, ours) + _compare_config(reference, ours) + _compare_tokenizer(reference, ours)


def read_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _compare_weights(reference: Path, ours: Path) -> list[str]:
    import torch

    a, b = read_weights(reference), read_weights(ours)
    out = []
    if set(a) != set(b):
        out.append(
            f"tensor names: only mergekit {sorted(set(a) - set(b))[:4]}, only evomerge {sorted(set(b) - set(a))[:4]}"
        )
    differ = [n for n in sorted(set(a) & set(b)) if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    if differ:
        first = differ[0]
        shared = len(set(a) & set(b))
        out.append(f"{len(differ)} of {shared} tensors differ (first {first}: {a[first].dtype} / {b[first].dtype})")
    return out


CONFIG_STAMPS = ("transformers_version",)


def read_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    for key in CONFIG_STAMPS:
        config.pop(key, None)
    if "torch_dtype" in config:  # transformers 5 reads either name
        config.setdefault("dtype", config.pop("torch_dtype"))
    return config


def _compare_config(reference: Path, ours: Path) -> list[str]:
    a, b = read_config(reference), read_config(ours)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [f"config.json {k}: mergekit {a.get(k)!r}, evomerge {b.get(k)!r}" for k in keys[:6]]


def tokenizer_facts(folder: Path) -> dict | None:
    """What a tokenizer means to a user: its vocabulary, added tokens and their settings, special tokens, chat
    template; None where the folder has no tokenizer."""
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    added = {
        i: (str(t.content), t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
        for i, t in tok.added_tokens_decoder.items()
    }
    return {
        "vocab": tok.get_vocab(),
        "added": added,
        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "chat_template": tok.chat_template,
    }


def _compare_tokenizer(reference: Path, ours: Path) -> list[str]:
    a, b = tokenizer_facts(reference), tokenizer_facts(ours)
    if a is None or b is None:
        return (
            []
            if a is b
            else [f"tokenizer: mergekit {'none' if a is None else 'one'}, evomerge {'none' if b is None else 'one'}"]
        )
    return [f"tokenizer {k} differs" for k in a if a[k] != b[k]]


def loads_completely(folder: Path) -> bool:
    """Whether transformers loads the checkpoint as its config.json's architecture with no weight missing."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    arch = getattr(transformers, (config.get("architectures") or [""])[0], None)
    if arch is None:
        return False
    try:
        _, info = arch.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, RuntimeError):
        return False
    return not info["missing_keys"] and not info.get("mismatched_keys")


def _same_rows_per_token(out: Path, ids: dict[str, int], our_ids: dict[str, int]) -> bool:
    """Whether the two outputs have the same tokens, each token's vocabulary rows equal, and every other tensor
    equal: the same model with its tokens numbered otherwise."""
    import torch

    a, b = read_weights(out / "mergekit"), read_weights(out / "evomerge")
    if set(ids) != set(our_ids) or set(a) != set(b):
        return False
    tokens = sorted(ids)
    for name in a:
        if a[name].shape[:1] == (len(ids),):  # one row per token: compare token by token
            mine, theirs = a[name][[ids[t] for t in tokens]], b[name][[our_ids[t] for t in tokens]]
        else:
            mine, theirs = a[name], b[name]
        if mine.dtype != theirs.dtype or not torch.equal(mine, theirs):
            return False
    return True


def outcome(case: Case, result: Result, out: Path) -> str:
    """What happened, in the words of cases.yaml's `expect`: equal, both_refuse, mergekit_broken (mergekit's output
    does not load completely, evomerge's does), mergekit_fails (mergekit exits non-zero, evomerge's output loads),
    mergekit_blank_tokenizer (the same weights and config; mergekit wrote a tokenizer of at most one token where
    the inputs have none), mergekit_no_tokenizer (the same but for evomerge's tokenizer), union_numbered_otherwise
    (the same tokens and rows, numbered otherwise), else `differ: ...` or `evomerge_fails: ...`."""
    if result.equal:
        return "equal"
    if result.mergekit_rc != 0 and result.evomerge_rc == 2:
        return "both_refuse"
    if result.evomerge_rc != 0:
        return "evomerge_fails: " + (result.evomerge_stderr.strip().splitlines() or [""])[-1]
    if result.mergekit_rc != 0:
        return "mergekit_fails" if loads_completely(out / "evomerge") else "mergekit_fails, evomerge incomplete"
    tokenizers = [tokenizer_facts(out / "mergekit"), tokenizer_facts(out / "evomerge")]
    rest = [d for d in result.differences if not d.startswith("tokenizer")]
    if not rest and tokenizers[1] is None and tokenizers[0] is not None and len(tokenizers[0]["vocab"]) <= 1:
        return "mergekit_blank_tokenizer"
    if not rest and tokenizers[0] is None and tokenizers[1] is not None:
        return "mergekit_no_tokenizer"
    if tokenizers[0] and tokenizers[1] and _same_rows_per_token(out, tokenizers[0]["vocab"], tokenizers[1]["vocab"]):
        return "union_numbered_otherwise"
    if not loads_completely(out / "mergekit") and loads_completely(out / "evomerge"):
        return "mergekit_broken"
    return "differ: " + "; ".join(result.differences)
