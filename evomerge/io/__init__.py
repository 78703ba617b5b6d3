"""All reading and writing of checkpoints: lazy memory-mapped inputs, streaming sharded export (atomic),
and verification of an export against the sha256 its recipe recorded."""
from __future__ import annotations

from evomerge.io.atomic import atomic_dir
from evomerge.io.checkpoint import Checkpoint, check_compatible
from evomerge.io.export import export_recipe
from evomerge.io.verify import verify_checkpoint

__all__ = ["Checkpoint", "atomic_dir", "check_compatible", "export_recipe", "verify_checkpoint"]
