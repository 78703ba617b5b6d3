"""The resource plan of a search: before any model loads, what each worker needs on its device(s) and in host
memory, what each node needs for the memory-mapped inputs, against the devices the workers will get, and how long
a trial and the night take (`timing.py`); printed by `evomerge search` at start and by `evomerge audit CONFIG
--plan`, and refused (exit 2, naming the setting to change) when it cannot fit, so a search too large for its
machines stops in seconds instead of being killed for memory hours later (docs/architecture.md, "Design choices").

    plan = plan_search(cfg)          # facts.py: headers + tasks; memory.py: the terms; devices.py: the machines
    plan.lines(); plan.check()

Every term and its formula: `memory.py`, `timing.py`. How the figures compare with measured runs: bench/scale.py
(memory), bench/time_plan.py (time).
"""

from evomerge.capacity.devices import Devices, Node, cluster_devices, given_devices, local_devices, parse_size
from evomerge.capacity.facts import ModelFacts, TaskFacts, gb, resident_dtype
from evomerge.capacity.memory import Settings, WorkerMemory, worker_memory
from evomerge.capacity.plan import Plan, evaluate_plan, plan_search

__all__ = [
    "Devices",
    "ModelFacts",
    "Node",
    "Plan",
    "Settings",
    "TaskFacts",
    "WorkerMemory",
    "cluster_devices",
    "evaluate_plan",
    "gb",
    "given_devices",
    "local_devices",
    "parse_size",
    "plan_search",
    "resident_dtype",
    "worker_memory",
]
