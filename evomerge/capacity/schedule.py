"""What a search's budget buys, said before it starts: the enqueued baselines, the portfolio's default merges, the
refinement rounds (when, how many Adam steps, how many points they enqueue) and the sampled trials left; a budget
the defaults use up is said up front, with what it will buy and the setting that changes it.

    schedule = Schedule.of(cfg, n_baselines=len(space.baselines(cfg.models)), n_portfolio=6)
    for line in schedule.lines(cfg): log(line)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.config.schema import SearchConfig


@dataclass(frozen=True)
class Schedule:
    n_trials: int
    baselines: int  # enqueued first and counted in the budget: the method's default merge, each source alone
    portfolio: int  # other methods' default merges, scored before the first trial, outside the budget
    starts: tuple[int, ...] = ()  # the trial count at which each refinement round starts
    arms: tuple[str, ...] = ()  # each round's kind
    steps: int = 0  # Adam steps per round
    every: int = 1  # steps between enqueued points

    @classmethod
    def of(cls, cfg: SearchConfig, n_baselines: int, n_portfolio: int) -> Schedule:
        n = cfg.budget.n_trials
        if cfg.refine is None:
            return cls(n, n_baselines, n_portfolio)
        starts = tuple(cfg.refine.starts(n))
        steps, every = cfg.refine.schedule(n)
        arms = tuple(cfg.refine.arm(r) for r in range(len(starts)))
        return cls(n, n_baselines, n_portfolio, starts, arms, steps, every)

    @property
    def points_per_round(self) -> int:
        """Points a round enqueues: one every `every` steps and the last (the start itself is a trial already)."""
        return self.steps // self.every + (self.steps % self.every != 0) if self.starts else 0

    @property
    def points_scored(self) -> int:
        """Refinement points the budget scores: a round's points are asked first, until the next round or the end."""
        ends = (*self.starts[1:], self.n_trials)
        return sum(
            min(self.points_per_round, max(0, end - max(start, self.baselines)))
            for start, end in zip(self.starts, ends)
        )

    @property
    def sampled(self) -> int:
        return max(0, self.n_trials - self.baselines - self.points_scored)

    def lines(self, cfg: SearchConfig) -> list[str]:
        """The budget's lines (and its warnings, `budget: warning: ...`), logged after the plan."""
        out = [
            f"budget: {self.n_trials} trials = {min(self.baselines, self.n_trials)} enqueued baselines (the default "
            f"merge, each source alone) + {self.points_scored} refinement points + {self.sampled} sampled by "
            f"{cfg.sampler.name}"
            + (
                f"; first, {self.portfolio} default merges of other methods are scored (outside the budget)"
                if self.portfolio
                else ""
            )
        ]
        if self.starts:
            at = ("trials " if len(self.starts) > 1 else "trial ") + ", ".join(map(str, self.starts))
            out.append(
                f"budget: {len(self.starts)} refinement round{'s' * (len(self.starts) != 1)} "
                f"({', '.join(self.arms)}) of {self.steps} Adam steps each, at {at}, each enqueueing "
                f"{self.points_per_round} points (refine.steps, refine.every, refine.at)"
            )
        return out + [f"budget: warning: {text}" for text in self.warnings(cfg)]

    def warnings(self, cfg: SearchConfig) -> list[str]:
        out = []
        if self.baselines >= self.n_trials:
            out.append(
                f"the {self.baselines} enqueued baselines use the whole budget of {self.n_trials}: nothing is "
                f"searched; raise budget.n_trials (or --n-trials) above {self.baselines}, e.g. {self.baselines + 20}"
            )
        enqueued = self.points_per_round * len(self.starts)
        if self.starts and enqueued > self.points_scored:
            auto = cfg.refine.model_copy(update={"steps": "auto", "every": "auto"}).schedule(self.n_trials)[0]
            out.append(
                f"the refinement rounds cost {len(self.starts)} x {self.steps} gradient steps and enqueue {enqueued} "
                f"points, of which the budget scores {self.points_scored}; for a budget this small set refine.steps: "
                f"auto and refine.every: auto ({auto} steps a round here), or refine: null"
            )
        return out


__all__ = ["Schedule"]
