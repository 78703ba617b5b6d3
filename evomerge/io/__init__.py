"""All reading and writing of checkpoints: lazy memory-mapped inputs, streaming sharded export."""
from __future__ import annotations

from evomerge.io.checkpoint import Checkpoint, check_compatible
from evomerge.io.export import export_recipe

__all__ = ["Checkpoint", "check_compatible", "export_recipe"]
