"""Shared fixtures: one tiny zoo per test session, offline environment for every test."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.offline import go_offline

go_offline()

# Tiny models: one thread is as fast as two, and leaves the other core to Ray workers and subprocesses.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """Base + 'add' and 'reverse' specialists (tiny shape): `zoo/base`, `zoo/add`, `zoo/reverse`, `zoo/zoo.json`."""
    from evomerge.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, seed=0, size="tiny", log=None)
    return out
