"""The gradient refinement: torch only, never Optuna.

- `descent`: the one loop both refiners share (micro-batches, backward, Adam within bounds).
- `job`: the typed job a worker receives (`RefineJob`) and the path it returns (`PathPoint`).
- `tensor`: the refiner of the space's own numbers (one weight / lambda per tensor group).
- `rows`: the refiner of one coefficient per output row (on the answers' likelihood, or distillation targets).
- `differentiable`: the differentiable merge (each method's merge written in torch, gradients to its parameters).
- `losses`: the refinement's loss (the answers' likelihood) and its batches.
- `footprint`: the memory a refinement needs (the resource plan reads it).
- `distill`: the distillation targets (each search task's best source).

Import from the modules; this package imports nothing itself."""
