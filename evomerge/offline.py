"""Everything runs offline: no hub, no telemetry, no library progress bars on stderr. Called before any HF import."""

from __future__ import annotations

import os

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A cold datasets cache prints "Generating test split" bars; errors must stay one line on stderr.
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def go_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
