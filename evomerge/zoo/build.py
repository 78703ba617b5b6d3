"""`evomerge zoo build`: a base trained briefly on a mixture of skills, then specialists fine-tuned from it.

    evomerge zoo build --out zoo --seed 0        # full zoo, a few minutes on 2 cores
    evomerge zoo build --out /tmp/z --size tiny  # the test suite's zoo, seconds
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from evomerge.zoo.skills import SKILLS
from evomerge.zoo.variants import DEFAULT_VARIANT, ZooVariant, get_variant


# --size, the older name of two variants (full: the demo's zoo)
SIZES = {"full": DEFAULT_VARIANT, "tiny": "tiny"}


def _mixture(skills: tuple[str, ...]) -> str:
    """('add', 'add', 'copy') -> '2/3 add, 1/3 copy'."""
    counts = {s: skills.count(s) for s in dict.fromkeys(skills)}
    return ", ".join(f"{n}/{len(skills)} {s}" if len(counts) > 1 else s for s, n in counts.items())


def eval_prompts() -> set[str]:
    """Every prompt of every eval split: training never sees them."""
    return {ex.prompt for s in SKILLS.values() for rows in s.eval_splits().values() for ex in rows}


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of a model's weight files in name order: what `Checkpoint.sha256` (and so every recipe's
    provenance) records for it."""
    from evomerge.io.digest import files_sha256

    return files_sha256(sorted(model_dir.glob("*.safetensors")))


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """torch's deterministic algorithms and a fixed thread count for the block only (another thread count sums
    floats in another order, so the same seed would give other weights); the caller's settings come back."""
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads_before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def is_zoo(folder: Path) -> bool:
    return (folder / "zoo.json").is_file()


def _save(model, tokenizer, out: Path) -> None:
    __import__("transformers").utils.logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def build_zoo(
    out: Path | str,
    seed: int = 0,
    size: str | None = None,
    log: Callable[[str], None] | None = print,
    variant: ZooVariant | str | None = None,
) -> dict:
    """Build base + specialists of a variant (default: the demo zoo) under `out` (atomically: built beside it and
    swapped in, so `out` holds the previous zoo or the new one, never neither; only an empty folder or an earlier
    zoo is replaced). `size` ("full", "tiny") is the older name of the variants DEFAULT_VARIANT and "tiny".
    Returns the manifest."""
    from evomerge.errors import ConfigError
    from evomerge.io.atomic import atomic_dir
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import make_model, train

    if size is not None and size not in SIZES:
        raise ConfigError(f"zoo size {size!r} is unknown; use one of: {', '.join(SIZES)}")
    if not isinstance(variant, ZooVariant):
        variant = get_variant(variant or SIZES[size or "full"])
    out = Path(out)
    log = log or (lambda _msg: None)
    tokenizer = build_tokenizer()
    held = eval_prompts()
    seed_used = seed + variant.seed_offset
    with deterministic(), atomic_dir(out, is_zoo, "a zoo (no zoo.json)") as tmp:  # refuses before any training
        base_plan = variant.base_plan()
        log(f"base: {base_plan.steps} steps on {_mixture(base_plan.skills)}")
        model = make_model(variant.shape, tokenizer, seed_used)
        train(model, tokenizer, base_plan, seed_used, held, log)
        _save(model, tokenizer, tmp / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        reference = copy.deepcopy(model).eval() if variant.kl_replay else None
        for i, spec in enumerate(variant.specialists):
            plan = variant.plan(spec)
            where = "" if spec.layers is None else f", layers {spec.layers[0]}-{spec.layers[1]} only"
            how = {"distilled": ", replay distilled from the base", "none": ", no replay (a plain fine-tune)"}.get(
                variant.replay_kind, ""
            )
            log(f"{spec.name}: {plan.steps} steps at lr {plan.lr:g} from base on {_mixture(plan.skills)}{where}{how}")
            model.load_state_dict(base_state)
            train(model, tokenizer, plan, seed_used + 1 + i, held, log, reference=reference)
            _save(model, tokenizer, tmp / spec.name)
        manifest = {
            "seed": seed,
            "variant": variant.name,
            "description": variant.description,
            "shape": asdict(variant.shape),
            "base": "base",
            "base_mix": list(dict.fromkeys(variant.base_mix)),
            "specialists": {s.name: [s.skill] for s in variant.specialists},
            "training": {s.name: {"steps": s.steps, "lr": s.lr, "layers": s.layers, "kl_replay": variant.kl_replay,
                                  "replay": variant.replay_kind}
                         for s in variant.specialists},
            "sha256": {d.name: weights_sha256(d) for d in sorted(tmp.iterdir()) if d.is_dir()},
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
