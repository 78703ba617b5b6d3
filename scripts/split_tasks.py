"""Split a JSONL of your own into three disjoint lm-eval tasks: search, validation and held-out.

    python scripts/split_tasks.py data/mine.jsonl --name mine --out my_tasks

The same as `evomerge tasks split` (evomerge/tasksplit.py, where the options and the split's rules are described),
kept for clones and older notes.
"""

from __future__ import annotations

from evomerge.tasksplit import main

if __name__ == "__main__":
    raise SystemExit(main())
