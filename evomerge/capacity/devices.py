"""The machines a search runs on, as the plan sees them: per node its host memory, CPUs and GPUs (count and free
memory), from the operating system and nvidia-smi here, or from what a Ray cluster reports for its nodes.

    local_devices()                    # this machine: /proc/meminfo, CPU affinity, nvidia-smi (CUDA_VISIBLE_DEVICES)
    cluster_devices()                  # the Ray cluster this process joined: ray.nodes() + a probe on each node
    given_devices("512G", "8x80G", 2)  # a machine described on the command line (evomerge audit --plan)

Nothing here creates a CUDA context: a driver that touched a GPU would keep ~0.5 GB of it for the whole search.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class Node:
    name: str
    host_available: int  # bytes (MemAvailable: free memory plus what the kernel can reclaim)
    host_total: int
    cpus: float
    gpus: float  # GPUs Ray hands out on this node
    gpu_free: tuple[int, ...] = ()  # bytes free on each GPU (empty when unknown)
    gpu_total: tuple[int, ...] = ()


@dataclass(frozen=True)
class Devices:
    nodes: tuple[Node, ...]
    where: str  # "this machine", "the Ray cluster at head:6379", "the machine given on the command line"
    no_gpu_reason: str = ""  # why a machine with GPUs cannot use them (a CPU build of torch), if so
    local: bool = True  # the driver runs on nodes[0] (local Ray or in-process)
    cpu_bound: bool = field(default=False)  # Ray packs actors by its CPUs (a cluster); locally we size Ray to them

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)


def _meminfo() -> tuple[int, int]:
    """(MemAvailable, MemTotal) in bytes."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    total = values.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return values.get("MemAvailable", total), total


def nvidia_smi() -> list[tuple[str, str, int, int]] | None:
    """[(index, uuid, free bytes, total bytes)] of every GPU nvidia-smi lists; None when there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,uuid,memory.free,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
            rows.append((parts[0], parts[1], int(parts[2]) * 2**20, int(parts[3]) * 2**20))
    return rows


def _visible(rows: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int, int]]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves (by index or UUID), as Ray and torch see them."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return rows
    wanted = [w.strip() for w in env.split(",") if w.strip()]
    return [r for w in wanted for r in rows if w in (r[0], r[1]) or (w.startswith("GPU-") and r[1].startswith(w))]


def local_devices() -> Devices:
    """This machine, as a locally started Ray (or an in-process worker) uses it."""
    available, total = _meminfo()
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    rows = nvidia_smi()
    gpus = _visible(rows) if rows else []
    reason = ""
    if gpus:
        import torch

        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
    node = Node(
        name="this machine",
        host_available=available,
        host_total=total,
        cpus=cpus,
        gpus=0.0 if reason else float(len(gpus)),
        gpu_free=() if reason else tuple(r[2] for r in gpus),
        gpu_total=() if reason else tuple(r[3] for r in gpus),
    )
    return Devices(nodes=(node,), where="this machine", no_gpu_reason=reason)


def _make_probe():
    """The probe run on each node of a Ray cluster: a nested function, so Ray ships it by value (it needs only the
    standard library there, whatever evomerge the node has)."""

    def probe() -> dict:
        import shutil as _shutil
        import subprocess as _sp

        mem: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                mem[key] = int(rest.split()[0]) * 1024
        gpus = []
        exe = _shutil.which("nvidia-smi")
        if exe:
            try:
                out = _sp.run(
                    [exe, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout
                gpus = [tuple(int(x) * 2**20 for x in line.split(",")) for line in out.splitlines() if line.strip()]
            except Exception:  # noqa: BLE001 - unknown GPU memory: the plan checks counts only
                gpus = []
        return {"available": mem.get("MemAvailable", 0), "total": mem.get("MemTotal", 0), "gpus": gpus}

    return probe


def cluster_devices(address: str, timeout: float = 60.0) -> Devices:
    """The alive nodes of the Ray cluster this process joined: Ray's CPUs and GPUs per node, each node's host and
    GPU memory from a probe task pinned to it (no CPU or GPU taken); Ray's `memory` resource where a probe does
    not answer within `timeout`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(_make_probe())
    refs = {
        n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in alive
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    found = {nid: ray.get(ref) for nid, ref in refs.items() if ref in ready}
    nodes = []
    for n in alive:
        res, seen = n.get("Resources", {}), found.get(n["NodeID"])
        ray_memory = int(res.get("memory", 0))
        gpus = float(res.get("GPU", 0))
        info = seen or {"available": ray_memory, "total": ray_memory, "gpus": []}
        listed = info["gpus"][: int(gpus)] if gpus else []
        nodes.append(
            Node(
                name=n.get("NodeManagerAddress", n["NodeID"][:8]),
                host_available=int(info["available"]) or ray_memory,
                host_total=int(info["total"]) or ray_memory,
                cpus=float(res.get("CPU", 0)),
                gpus=gpus,
                gpu_free=tuple(g[0] for g in listed),
                gpu_total=tuple(g[1] for g in listed),
            )
        )
    return Devices(nodes=tuple(nodes), where=f"the Ray cluster at {address}", local=False, cpu_bound=True)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)i?b?\s*$", re.I)


def parse_size(text: str, what: str) -> int:
    """'512G', '80GB', '1.5T', '2048M' -> bytes (decimal units, as the plan prints them); ConfigError naming `what`."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what}: {text!r} is not a size; write e.g. 512G, 80G or 1.5T")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def given_devices(host_memory: str | None, gpus: str | None, nodes: int = 1, cpus: float | None = None) -> Devices:
    """A machine (or `nodes` alike) described on the command line: `host_memory` ('512G'; default this machine's),
    `gpus` ('8x80G', '8' with this machine's GPU memory, '0'; default this machine's), `cpus` per node (default
    unknown: no CPU check, never this machine's count)."""
    here = local_devices().nodes[0]
    host = parse_size(host_memory, "--host-memory") if host_memory else here.host_available
    count, free = here.gpus, here.gpu_free
    if gpus is not None:
        count, free = _given_gpus(str(gpus), free)
    node = Node(
        name="the given machine",
        host_available=host,
        host_total=host,
        cpus=cpus or 0.0,  # 0: not given (the plan checks no CPU count it was not told)
        gpus=count,
        gpu_free=tuple(free),
        gpu_total=tuple(free),
    )
    where = "the machine given on the command line" if nodes == 1 else f"{nodes} nodes given on the command line"
    if not host_memory:  # what the plan reads is this machine's, and the reader must know it
        where += " (with this machine's free host memory: --host-memory sets it)"
    return Devices(nodes=(node,) * max(1, nodes), where=where, local=nodes == 1, cpu_bound=bool(cpus))


def _given_gpus(text: str, here: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """(count, free bytes of each) of a `--gpus` value: 8x80G, 8 (this machine's GPU memory, else 80 GB) or 0; a
    size without its unit is refused (8x80 would read as 80 bytes)."""
    number, _, size = text.lower().partition("x")
    if not number.strip().isdigit():
        raise ConfigError(f"--gpus: {text!r} is not a GPU count; write e.g. 8x80G, 8 or 0")
    if size and not re.search(r"[kmgtp]i?b?\s*$", size.strip(), re.I):
        raise ConfigError(
            f"--gpus: {text!r} gives no unit for each GPU's memory; write {number.strip()}x{size.strip()}G "
            f"({size.strip()} GB per GPU)"
        )
    each = parse_size(size, "--gpus") if size else (here[0] if here else int(80e9))
    return float(number), tuple([each] * int(number))


__all__ = ["Devices", "Node", "cluster_devices", "given_devices", "local_devices", "nvidia_smi", "parse_size"]
