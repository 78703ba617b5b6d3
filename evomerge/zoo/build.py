"""`evomerge zoo build`: a base trained briefly on a mixture of skills, then specialists fine-tuned from it.

    evomerge zoo build --out zoo --seed 0        # full zoo, a few minutes on 2 cores
    evomerge zoo build --out /tmp/z --size tiny  # the test suite's zoo, seconds
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from evomerge.zoo.skills import SKILLS
from evomerge.zoo.train import ModelShape, TrainPlan


@dataclass(frozen=True)
class ZooSpec:
    shape: ModelShape
    base: TrainPlan
    specialists: dict[str, TrainPlan]


# The base learns string skills (copy, sort, shift) and some addition; it never sees reversal. Each specialist
# then fine-tunes from it on its own skill (4 parts in 8) plus a replay of the base's mixture (4 parts in 8), as
# practitioners fine-tune with some general data mixed in: without the replay a specialist forgets what the
# base knew, and that forgetting is the largest part of its task vector, which then wipes out the other
# specialist's skill in any merge (bench/zoo_experiments.md). Learning rate 1e-3 for 300 steps: task
# vectors of 14-18% of the base's norm.
MIX = ("copy", "sort", "shift", "add")
REPLAY = 4  # parts of the specialist's own skill against one part of each skill of MIX


def specialist(skill: str, steps: int, batch: int) -> TrainPlan:
    return TrainPlan((skill,) * REPLAY + MIX, steps=steps, lr=1e-3, batch=batch)


SIZES: dict[str, ZooSpec] = {
    "full": ZooSpec(
        shape=ModelShape(hidden=64, layers=6, heads=4, intermediate=192),
        base=TrainPlan(MIX, steps=500, lr=3e-3, batch=48),
        specialists={"add": specialist("add", 300, 48), "reverse": specialist("reverse", 300, 48)},
    ),
    "tiny": ZooSpec(
        shape=ModelShape(hidden=32, layers=4, heads=2, intermediate=64),
        base=TrainPlan(MIX, steps=150, lr=3e-3, batch=32),
        specialists={"add": specialist("add", 60, 32), "reverse": specialist("reverse", 60, 32)},
    ),
}


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
def deterministic() -> Iterator[None]:
    """torch's deterministic algorithms for the block only; the caller's setting comes back afterwards."""
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def is_zoo(folder: Path) -> bool:
    return (folder / "zoo.json").is_file()


def _save(model, tokenizer, out: Path) -> None:
    __import__("transformers").utils.logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def build_zoo(out: Path | str, seed: int = 0, size: str = "full", log: Callable[[str], None] | None = print) -> dict:
    """Build base + specialists under `out` (atomically: built beside it and swapped in, so `out` holds the
    previous zoo or the new one, never neither; only an empty folder or an earlier zoo is replaced).
    Returns the manifest."""
    from evomerge.errors import ConfigError
    from evomerge.io.atomic import atomic_dir
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import make_model, train

    if size not in SIZES:
        raise ConfigError(f"zoo size {size!r} is unknown; use one of: {', '.join(SIZES)}")
    spec = SIZES[size]
    out = Path(out)
    log = log or (lambda _msg: None)
    tokenizer = build_tokenizer()
    held = eval_prompts()
    with deterministic(), atomic_dir(out, is_zoo, "a zoo (no zoo.json)") as tmp:  # refuses before any training
        log(f"base: {spec.base.steps} steps on {_mixture(spec.base.skills)}")
        model = make_model(spec.shape, tokenizer, seed)
        train(model, tokenizer, spec.base, seed, held, log)
        _save(model, tokenizer, tmp / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for i, (name, plan) in enumerate(spec.specialists.items()):
            log(f"{name}: {plan.steps} steps from base on {_mixture(plan.skills)}")
            model.load_state_dict(base_state)
            train(model, tokenizer, plan, seed + 1 + i, held, log)
            _save(model, tokenizer, tmp / name)
        manifest = {
            "seed": seed,
            "size": size,
            "shape": asdict(spec.shape),
            "base": "base",
            "specialists": {name: list(dict.fromkeys(plan.skills)) for name, plan in spec.specialists.items()},
            "sha256": {d.name: weights_sha256(d) for d in sorted(tmp.iterdir()) if d.is_dir()},
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
