"""Merging: recipe -> per-tensor parameters (plan) -> kernels (`kernels/`, a named set) -> a resident model or a stream."""
from __future__ import annotations

from evomerge.merge.materialize import Materializer, merge_tensor, merged_tensors, tensor_seed
from evomerge.merge.methods import METHODS, RANDOM_METHODS, get_method
from evomerge.merge.plan import Plan, TensorParams, layer_t

__all__ = [
    "METHODS",
    "RANDOM_METHODS",
    "Materializer",
    "Plan",
    "TensorParams",
    "get_method",
    "layer_t",
    "merge_tensor",
    "merged_tensors",
    "tensor_seed",
]
