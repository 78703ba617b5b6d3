"""`evomerge report RUN_DIR`: held-out comparison of a study's best recipe against sources, default merges and
the routing oracle, with figures, written to `RUN_DIR/report/`.

    from evomerge.report import build_report
    result = build_report("runs/demo")       # result.report: runs/demo/report/report.md
"""
from __future__ import annotations

from evomerge.report.build import ReportResult, build_report
from evomerge.report.compare import Comparison, Row, TrialRow, Verdict, compare_run
from evomerge.report.defaults import default_recipe
from evomerge.report.markdown import statement, text_table

__all__ = [
    "Comparison",
    "ReportResult",
    "Row",
    "TrialRow",
    "Verdict",
    "build_report",
    "compare_run",
    "default_recipe",
    "statement",
    "text_table",
]
