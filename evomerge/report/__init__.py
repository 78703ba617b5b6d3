"""What a study found, for people: the held-out comparison of the exported recipe against its sources, the
default merges and the routing oracle (`compare`), its figures (`figures`) and report.md (`markdown`), written
to `RUN_DIR/report/` by `build`; and `evomerge status` (`status`). Default merges are defined in
`evomerge/candidate/portfolio.py`.

    from evomerge.report import build_report
    result = build_report("runs/demo")       # result.report: runs/demo/report/report.md
"""

from __future__ import annotations

from evomerge.report.build import ReportResult, build_report
from evomerge.report.compare import Comparison, Row, TrialRow, Verdict, compare_run, text_comparison
from evomerge.report.markdown import statement

__all__ = [
    "Comparison",
    "ReportResult",
    "Row",
    "TrialRow",
    "Verdict",
    "build_report",
    "compare_run",
    "statement",
    "text_comparison",
]
