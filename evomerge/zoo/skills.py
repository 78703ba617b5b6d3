"""Character-level toy skills: each a deterministic generator of (prompt, answer, distractors).

A skill's eval examples (search, validation and held-out splits) come from one fixed seed and never
appear in training data: `Skill.is_eval` lets the trainer skip them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghij"


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class Skill:
    name: str
    make: Callable[[random.Random], Example]
    description: str

    def sample(self, rng: random.Random) -> Example:
        return self.make(rng)

    def eval_splits(self, sizes: dict[str, int] | None = None, seed: int = 1234) -> dict[str, list[Example]]:
        """Disjoint splits by prompt; fixed by `seed`, independent of the zoo's training seed."""
        sizes = sizes or {"search": 200, "validation": 200, "heldout": 300}
        rng = random.Random(f"{self.name}:{seed}")
        seen: set[str] = set()
        out: dict[str, list[Example]] = {}
        for split, n in sizes.items():
            rows = []
            while len(rows) < n:
                ex = self.make(rng)
                if ex.prompt in seen:
                    continue
                seen.add(ex.prompt)
                rows.append(ex)
            out[split] = rows
        return out


def _distinct(answer: str, candidates: list[str], rng: random.Random, fill: Callable[[], str], k: int = 3) -> tuple[str, ...]:
    picked: list[str] = []
    for c in candidates + [fill() for _ in range(50)]:
        if c != answer and c not in picked and c:
            picked.append(c)
        if len(picked) == k:
            break
    return tuple(picked)


def _add(rng: random.Random) -> Example:
    a, b = rng.randrange(100, 1000), rng.randrange(10)
    s = a + b
    near = [str(s + 1), str(s - 1), str(s + 10), str(s - 10), str(a * 10 + b)]
    rng.shuffle(near)
    return Example(f"{a}+{b}=", str(s), _distinct(str(s), near, rng, lambda: str(rng.randrange(199))))


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _swap_adjacent(s: str, rng: random.Random) -> str:
    if len(s) < 2:
        return s
    i = rng.randrange(len(s) - 1)
    return s[:i] + s[i + 1] + s[i] + s[i + 2:]


def _replace_one(s: str, rng: random.Random) -> str:
    i = rng.randrange(len(s))
    return s[:i] + rng.choice([c for c in LETTERS if c != s[i]]) + s[i + 1:]


def _reverse(rng: random.Random) -> Example:
    w = _word(rng, 5, 8)
    ans = w[::-1]
    near = [_swap_adjacent(ans, rng), _swap_adjacent(ans, rng), _replace_one(ans, rng), w]
    rng.shuffle(near)
    return Example(f"rev {w}=", ans, _distinct(ans, near, rng, lambda: _word(rng, len(w), len(w))))


def _sort(rng: random.Random) -> Example:
    w = _word(rng)
    ans = "".join(sorted(w))
    near = [w, w[::-1], _swap_adjacent(ans, rng), "".join(sorted(w, reverse=True))]
    rng.shuffle(near)
    return Example(f"sort {w}=", ans, _distinct(ans, near, rng, lambda: _word(rng, len(w), len(w))))


def _shift(rng: random.Random) -> Example:
    w = _word(rng, 4, 7)
    ans = "".join(chr(ord(c) + 1) for c in w)
    near = [w, "".join(chr(ord(c) + 2) for c in w), ans[:-1] + w[-1], w[0] + ans[1:]]
    rng.shuffle(near)
    return Example(f"shift {w}=", ans, _distinct(ans, near, rng, lambda: _replace_one(ans, rng)))


def _copy(rng: random.Random) -> Example:
    w = _word(rng)
    near = [w[::-1], _swap_adjacent(w, rng), "".join(sorted(w))]
    return Example(f"copy {w}=", w, _distinct(w, near, rng, lambda: _word(rng, len(w), len(w))))


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", _add, "three-digit plus one-digit addition: '347+8=' -> '355'"),
        Skill("reverse", _reverse, "string reversal: 'rev abc=' -> 'cba'"),
        Skill("sort", _sort, "letter sorting: 'sort cab=' -> 'abc'"),
        Skill("shift", _shift, "letter shift: 'shift abc=' -> 'bcd'"),
        Skill("copy", _copy, "copying: 'copy abc=' -> 'abc'"),
    )
}
