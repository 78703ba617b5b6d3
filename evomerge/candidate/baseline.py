"""The label of a baseline trial: what a study enqueues (or adds) so that its result is never worse than a default.

    BaselineLabel.defaults()            # "defaults": the study's method at its search space's defaults
    BaselineLabel.alone("add")          # "only add": one model alone (slerp's ends: "only base", "only <model>")
    BaselineLabel.of_method("ties")     # "ties (defaults)": another method's default merge (the portfolio)
    BaselineLabel("only add").model     # "add"; .method is None; .is_defaults is False

A label is the string stored in the trial's `baseline` user attribute (study/record.py), so studies written
before it existed read back as they are; code asks the label what it is instead of parsing its text.
"""

from __future__ import annotations

from typing import Any

DEFAULTS = "defaults"
_ALONE = "only "
_METHOD = " (defaults)"


class BaselineLabel(str):
    """A baseline trial's label: the study's method defaults, another method's defaults, or one model alone."""

    @classmethod
    def defaults(cls) -> BaselineLabel:
        return cls(DEFAULTS)

    @classmethod
    def alone(cls, model_key: str) -> BaselineLabel:
        return cls(f"{_ALONE}{model_key}")

    @classmethod
    def of_method(cls, method: str) -> BaselineLabel:
        return cls(f"{method}{_METHOD}")

    @property
    def is_defaults(self) -> bool:
        """The study's own method at its space's defaults (the baseline the guard always validates)."""
        return self == DEFAULTS

    @property
    def model(self) -> str | None:
        """The model (its key: folder name, or "base") this baseline is alone, else None."""
        return self[len(_ALONE) :] if self.startswith(_ALONE) else None

    @property
    def method(self) -> str | None:
        """The method whose default merge this baseline is (the portfolio's), else None."""
        return self[: -len(_METHOD)] if self.endswith(_METHOD) else None

    def describe(self) -> str:
        """How a figure's legend names it."""
        if self.is_defaults:
            return "default merge (baseline)"
        if self.model is not None:
            return f"{self.model} alone (baseline)"
        return f"{self} (baseline)"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


__all__ = ["DEFAULTS", "BaselineLabel"]
