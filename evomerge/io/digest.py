"""sha256 of files, read in 1 MiB chunks (a checkpoint never has to fit in memory to be hashed)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def files_sha256(paths: Iterable[Path | str]) -> str:
    """One hash over the files' bytes, concatenated in the given order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path | str) -> str:
    return files_sha256([path])
