"""The run directory `runs/<name>/`, the one place that names its files:

    runs/<name>/config.yaml        the resolved config (`evomerge search` writes it on every run)
    runs/<name>/study.db           the Optuna study (the default SQLite storage)
    runs/<name>/coefficients/      per-row multipliers of refined points, one file per point, named by its sha256
    runs/<name>/report/            `evomerge report`: report.md, comparison.json, the figures
    runs/<name>/best/              `evomerge export`: the exported recipe, checkpoint and model card

    run = RunDir.named("demo")            # runs/demo, relative to the current directory
    run.config, run.study_db, run.comparison

Paths only: what reads or writes these files lives with its step (config.schema, refine.rows, report, export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUNS_DIR = Path("runs")


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (`path`: runs/<name>, or any folder a run was copied to)."""

    path: Path

    @classmethod
    def named(cls, name: str) -> RunDir:
        return cls(RUNS_DIR / name)

    @classmethod
    def at(cls, path: Path | str) -> RunDir:
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def coefficients(self) -> Path:
        return self.path / "coefficients"

    def coefficient_file(self, digest: str) -> Path:
        """A refined point's multipliers, named by (the start of) their sha256."""
        return self.coefficients / f"{digest[:16]}.safetensors"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def report_md(self) -> Path:
        return self.report / "report.md"

    @property
    def comparison(self) -> Path:
        """The held-out comparison `evomerge report` scored (status and the model card read it)."""
        return self.report / "comparison.json"

    @property
    def best(self) -> Path:
        """Where `evomerge export` writes by default."""
        return self.path / "best"


__all__ = ["RUNS_DIR", "RunDir"]
