"""The real member's skills: short tasks that SmolLM2-135M-Instruct does not do, each a seeded generator of
(prompt, answer, choices), scored as lm-eval tasks in `eval_tasks/smol/` (written by `evomerge.zoo.real_tasks`).

Digits are single tokens in SmolLM2's vocabulary, so each skill is a rule over a few tokens that a short CPU
fine-tune learns and the base never saw: wide margins between a specialist and the base, whatever the machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RealExample:
    prompt: str  # the user's text (the chat message, or the plain prompt)
    answer: str  # the reference answer, without leading space
    choices: tuple[str, ...] = ()  # multiple choice: every option, the answer among them


@dataclass(frozen=True)
class RealSkill:
    name: str
    make: Callable[[random.Random], RealExample]
    description: str
    kind: str  # "generate" (exact match of a greedy answer) or "choice" (multiple choice)
    chat: bool = False  # trained and scored through the model's chat template

    def eval_splits(self, sizes: dict[str, int] | None = None) -> dict[str, list[RealExample]]:
        """Disjoint splits by prompt, fixed by the skill's name alone."""
        sizes = sizes or {"search": 200, "validation": 200, "heldout": 300}
        rng = random.Random(f"smol:{self.name}:eval")
        seen: set[str] = set()
        out: dict[str, list[RealExample]] = {}
        for split, n in sizes.items():
            rows: list[RealExample] = []
            while len(rows) < n:
                ex = self.make(rng)
                if ex.prompt not in seen:
                    seen.add(ex.prompt)
                    rows.append(ex)
            out[split] = rows
        return out


CODE = {str(d): str((d + 3) % 10) for d in range(10)}  # each digit plus three, modulo ten


def _code(rng: random.Random) -> RealExample:
    number = str(rng.randrange(1000, 100000))
    return RealExample(f"Code {number}:", "".join(CODE[d] for d in number))


def _double(rng: random.Random) -> RealExample:
    number = str(rng.randrange(100, 100000))
    return RealExample(f"Stutter {number}:", "".join(d + d for d in number))


def _parity(rng: random.Random) -> RealExample:
    number = rng.randrange(100, 100000)
    answer = "even" if number % 2 == 0 else "odd"
    return RealExample(f"Is {number} odd or even? Answer with one word.", answer, ("odd", "even"))


REAL_SKILLS: dict[str, RealSkill] = {
    s.name: s
    for s in (
        RealSkill("code", _code, "each digit plus three, modulo ten: 'Code 4817:' -> '7140'", "generate"),
        RealSkill("stutter", _double, "each digit written twice: 'Stutter 481:' -> '448811'", "generate"),
        RealSkill(
            "parity",
            _parity,
            "odd or even, asked in the chat template: 'Is 4817 odd or even? ...' -> 'odd'",
            "choice",
            chat=True,
        ),
    )
}

__all__ = ["CODE", "REAL_SKILLS", "RealExample", "RealSkill"]
