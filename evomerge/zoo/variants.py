"""The zoo family: named variants of a base and 2-4 specialists, for the demo, the tests and the search suite.

    evomerge zoo build --variant trio --out zoos/trio            # one variant
    evomerge zoo build --variant trio --layers 6 --hidden 96      # the same recipe, another shape

A variant says which skills the base learns (`base_mix`), which specialists are fine-tuned from it (each on its
own skill plus a replay of the base's mixture, half and half; or, with `replay=()`, on its own skill alone: a plain
fine-tune, which forgets what it does not train), the model's shape (architecture, depth, width, attention heads)
and the training budgets.
Specialists may differ in learning rate and steps (louder or quieter task vectors) and may train only some
decoder layers (`layers`), as partially fine-tuned models do. Which variants ship and why:
`bench/zoo_family.md` and README's zoo-family table.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from evomerge.errors import ConfigError, close_matches
from evomerge.zoo.train import ModelShape, TrainPlan

DEFAULT_VARIANT = "pair"  # `evomerge zoo build` and `evomerge demo` build this one
MIX = ("copy", "sort", "shift", "add")  # what every base learns unless a variant says otherwise
REPLAY = 4  # parts of a specialist's own skill against one part of each skill of the base's mixture


@dataclass(frozen=True)
class Specialist:
    """One fine-tune of the base: its skill, budget, and which decoder layers it may change (None: all weights)."""

    skill: str
    steps: int = 300
    lr: float = 1e-3
    layers: tuple[int, int] | None = None  # [first, last] decoder layers trained; embeddings and head frozen

    @property
    def name(self) -> str:
        return self.skill


@dataclass(frozen=True)
class ZooVariant:
    name: str
    description: str
    specialists: tuple[Specialist, ...]
    shape: ModelShape = ModelShape()
    base_mix: tuple[str, ...] = MIX
    replay: tuple[str, ...] | None = None  # what specialists replay beside their skill (None: the base's mixture)
    base_steps: int = 500
    base_lr: float = 3e-3
    batch: int = 48
    kl_replay: bool = False  # replay by distillation from the base (see TrainPlan) instead of the right answers
    seed_offset: int = 0  # added to --seed, so variants built with the same seed are independent draws

    def base_plan(self) -> TrainPlan:
        return TrainPlan(self.base_mix, steps=self.base_steps, lr=self.base_lr, batch=self.batch)

    def plan(self, spec: Specialist) -> TrainPlan:
        replay = self.base_mix if self.replay is None else self.replay
        return TrainPlan((spec.skill,) * REPLAY + replay, steps=spec.steps, lr=spec.lr, batch=self.batch,
                         layers=spec.layers, own=spec.skill, kl_replay=self.kl_replay)

    @property
    def skills(self) -> list[str]:
        return [s.skill for s in self.specialists]

    @property
    def replay_kind(self) -> str:
        """How the specialists keep what they do not train: "none" (plain fine-tunes), "distilled" (the base's
        distributions, `kl_replay`) or "answers" (the right answers of the replayed skills)."""
        if self.replay == ():
            return "none"
        return "distilled" if self.kl_replay else "answers"


def _exposed(*skills: str, general: int = 2) -> tuple[str, ...]:
    """A base mixture that repeats the general skills `general` times and shows each of `skills` once: the base
    learns some of each specialist's skill, as pretraining covers a little of everything."""
    return MIX * general + skills


# The family's specialists replay by distillation from the base (`kl_replay`): each learns its own skill and keeps
# the base's behaviour elsewhere, neither forgetting it nor learning the other specialists' skills from the
# replay (a specialist that learns another's skill from its replay leaves the search nothing to find; one that
# forgets wipes the other skills out in every merge). bench/zoo_family.md has the numbers behind each choice.
VARIANTS: dict[str, ZooVariant] = {
    v.name: v
    for v in (
        ZooVariant(
            "classic",
            "the earlier demo zoo: base (hidden 64, 6 layers) and two specialists, addition and string reversal, "
            "each replaying the right answers of the base's mixture",
            (Specialist("add"), Specialist("reverse")),
            shape=ModelShape(hidden=64, layers=6, heads=4, intermediate=192),
        ),
        ZooVariant(
            "tiny",
            "the test suite's zoo (hidden 32, 4 layers), built in seconds",
            (Specialist("add", steps=60), Specialist("reverse", steps=60)),
            shape=ModelShape(hidden=32, layers=4, heads=2, intermediate=64),
            base_steps=150,
            batch=32,
        ),
        ZooVariant(
            "pair",
            "two specialists (addition, reversal) of a base that knows a little of both; hidden 64, 6 layers",
            (Specialist("add"), Specialist("reverse")),
            shape=ModelShape(hidden=64, layers=6, heads=4, intermediate=192),
            base_mix=_exposed("reverse"),
            kl_replay=True,
        ),
        ZooVariant(
            "trio",
            "three specialists (reversal, a letter cipher, letter doubling); hidden 64, 4 layers",
            (Specialist("reverse"), Specialist("cipher"), Specialist("dup")),
            shape=ModelShape(hidden=64, layers=4, heads=4, intermediate=192),
            base_mix=_exposed("reverse", "cipher", "dup", general=3),
            base_steps=400,
            kl_replay=True,
        ),
        ZooVariant(
            "quad",
            "four specialists (subtraction, reversal, rotation, doubling); hidden 96, 6 layers",
            (Specialist("sub"), Specialist("reverse"), Specialist("rotate"), Specialist("dup")),
            shape=ModelShape(hidden=96, layers=6, heads=4, intermediate=288),
            base_mix=_exposed("sub", "reverse", "rotate", "dup", general=2),
            base_steps=500,
            kl_replay=True,
        ),
        ZooVariant(
            "steep",
            "three specialists (reversal, cipher, doubling) of a base that saw little of them; hidden 64, 4 layers",
            (Specialist("reverse"), Specialist("cipher"), Specialist("dup")),
            shape=ModelShape(hidden=64, layers=4, heads=4, intermediate=192),
            base_mix=_exposed("reverse", "cipher", "dup", general=5),
            base_steps=400,
            kl_replay=True,
        ),
        ZooVariant(
            "plain",
            "pair's base with plain fine-tunes (addition, reversal) that replay nothing, so each forgets what it does "
            "not train, as ordinary fine-tunes do; hidden 64, 6 layers",
            (Specialist("add", lr=5e-4), Specialist("reverse", steps=150, lr=5e-4)),
            shape=ModelShape(hidden=64, layers=6, heads=4, intermediate=192),
            base_mix=_exposed("reverse"),
            replay=(),
        ),
        ZooVariant(
            "deep",
            "three specialists (subtraction, reversal, doubling) in a deeper, narrower model; hidden 48, 10 layers",
            (Specialist("sub"), Specialist("reverse"), Specialist("dup")),
            shape=ModelShape(hidden=48, layers=10, heads=4, intermediate=144),
            base_mix=_exposed("sub", "reverse", "dup", general=2),
            base_steps=500,
            kl_replay=True,
        ),
        ZooVariant(
            "qwen",
            "pair's recipe in Qwen2 (grouped-query attention, 2 key/value heads, q/k/v biases, tied embeddings): an "
            "addition specialist and a reversal specialist that ends below its base; hidden 64, 6 layers",
            (Specialist("add"), Specialist("reverse")),
            shape=ModelShape(hidden=64, layers=6, heads=4, intermediate=192, arch="qwen2", kv_heads=2, tied=True),
            base_mix=_exposed("reverse"),
            base_steps=800,
            base_lr=1e-3,  # Qwen2's base at pair's 3e-3 learned no reversal (bench/zoo_family.md)
            kl_replay=True,
        ),
        ZooVariant(
            "crowd",
            "four specialists (subtraction, reversal, cipher, doubling) in a small model; hidden 64, 4 layers",
            (Specialist("sub"), Specialist("reverse"), Specialist("cipher"), Specialist("dup")),
            shape=ModelShape(hidden=64, layers=4, heads=4, intermediate=192),
            base_mix=_exposed("sub", "reverse", "cipher", "dup", general=2),
            base_steps=500,
            kl_replay=True,
        ),
    )
}


def get_variant(
    name: str,
    *,
    skills: list[str] | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    steps: int | None = None,
) -> ZooVariant:
    """A shipped variant, optionally with other specialists' skills, depth, width or specialist steps."""
    from evomerge.zoo.skills import SKILLS

    if name not in VARIANTS:
        raise ConfigError(f"--variant {name!r}: no such zoo variant{close_matches(name, VARIANTS)}; "
                          f"use one of {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    if skills is not None:
        unknown = [s for s in skills if s not in SKILLS]
        if unknown:
            raise ConfigError(f"--skills: no skill {unknown[0]!r}{close_matches(unknown[0], SKILLS)}; "
                              f"use names from {', '.join(SKILLS)}")
        if not 2 <= len(skills) <= 4 or len(set(skills)) != len(skills):
            raise ConfigError(f"--skills: give 2 to 4 different skills, got {','.join(skills)}")
        template = v.specialists[0]
        v = replace(v, specialists=tuple(replace(template, skill=s, layers=None) for s in skills))
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: use at least 1 training step")
        v = replace(v, specialists=tuple(replace(s, steps=steps) for s in v.specialists))
    if layers is not None or hidden is not None:
        shape = v.shape
        if layers is not None:
            if not 1 <= layers <= 48:
                raise ConfigError(f"--layers {layers}: use 1 to 48 decoder layers")
            shape = replace(shape, layers=layers)
            v = replace(v, specialists=tuple(replace(s, layers=None) if s.layers and s.layers[1] >= layers else s
                                             for s in v.specialists))
        if hidden is not None:
            if hidden < shape.heads or hidden % shape.heads:
                raise ConfigError(f"--hidden {hidden}: use a multiple of the {shape.heads} attention heads")
            shape = replace(shape, hidden=hidden, intermediate=3 * hidden)
        v = replace(v, shape=shape)
    return v


__all__ = ["DEFAULT_VARIANT", "MIX", "REPLAY", "Specialist", "VARIANTS", "ZooVariant", "get_variant"]
