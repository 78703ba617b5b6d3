"""Where evomerge-1's TIES and DARE time goes: each pass of the kernel on one large tensor, against its floor.

    .venv/bin/python bench/kernel_phases.py                     # float32, a 5632 x 2048 MLP weight, ~1 min
    .venv/bin/python bench/kernel_phases.py --dtype bfloat16 --threads 1

Three inputs (base and two fine-tunes) of one tensor; every figure is the best of 3 runs, in ns per element
of the tensor. The floor is this tensor's share of bench/merge_speed.py's: three inputs read and one output
written at the memcpy bandwidth measured here. The passes (evomerge/merge/kernels/gta.py):
  ties pass 1     per task vector: the magnitude threshold (select.top_k: sample, one counting and gathering
                  pass, kthvalue among the candidates)
  dare pass 1     per task vector: counter-based mask, stored, and the fixed-point L1 sums for the rescale
  pass 2          deltas, masks, weights, sign election, normalization, into the output
  plain sum       base + delta1 + delta2 in three whole-tensor ops, for scale
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best(f, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads = kernel workers (default: all)")
    args = ap.parse_args()
    import os

    import torch

    import evomerge.merge.kernels.gta as gta
    from evomerge.merge.kernels.chunks import kernel_threads
    from evomerge.merge.kernels.counter import keep_threshold
    from evomerge.merge.kernels.select import top_k
    from evomerge.merge.methods import get_method

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(5632 * 2048, generator=g) * 0.02).to(dtype)
    models = [(base.float() + 0.002 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(2)]
    n, size = base.numel(), base.element_size()
    src = torch.ones(2**28)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / best(lambda: dst.copy_(src))
    src = dst = None  # free 2 GiB before the timings
    floor = 4 * n * size / bandwidth
    chunk = gta.CPU_CHUNK
    rows = []
    with kernel_threads() as workers:
        model = models[0]

        def mags(s, e, out):
            return torch.sub(model[s:e], base[s:e], out=out[: e - s]).abs_()

        def sample(stride):
            return (model[::stride] - base[::stride]).abs_()

        rows.append(("ties pass 1, one task vector", best(lambda: top_k(n, n // 2, mags, sample, chunk, base))))
        sel = top_k(n, n // 2, mags, sample, chunk, base)
        out = torch.empty_like(base)
        ties = [gta.Pruner(top=sel, work=dtype), gta.Pruner(top=sel, work=dtype)]
        rows.append(
            (
                "ties pass 2, two task vectors",
                best(
                    lambda: gta._combine(
                        get_method("ties"),
                        {"normalize": True, "lambda": 1.0},
                        base,
                        models,
                        ties,
                        [0.5, 0.5],
                        out,
                        chunk,
                    )
                ),
            )
        )
        dare = gta.Pruner(key=(1, 2), bound=keep_threshold(0.5), work=dtype, stored=torch.empty(n, dtype=torch.uint8))
        rows.append(("dare pass 1, one task vector", best(lambda: gta._first_pass(dare, base, model, chunk, True))))
        rows.append(
            (
                "dare_ties pass 2, two task vectors",
                best(
                    lambda: gta._combine(
                        get_method("dare_ties"),
                        {"normalize": False, "lambda": 1.0},
                        base,
                        models,
                        [dare, dare],
                        [0.5, 0.5],
                        out,
                        chunk,
                    )
                ),
            )
        )
        plain = [gta.Pruner(), gta.Pruner()]
        rows.append(
            (
                "task arithmetic pass (no masks)",
                best(
                    lambda: gta._combine(
                        get_method("task_arithmetic"),
                        {"normalize": False, "lambda": 1.0},
                        base,
                        models,
                        plain,
                        [0.5, 0.5],
                        out,
                        chunk,
                    )
                ),
            )
        )
    rows.append(
        ("plain sum, three whole-tensor ops", best(lambda: torch.add(models[0], models[1], out=out).add_(base)))
    )
    print(
        f"tensor {n / 1e6:.1f}M elements, {args.dtype}; {workers} kernel worker(s); memcpy {bandwidth / 1e9:.1f} GB/s; "
        f"floor {floor * 1e3:.1f} ms ({floor / n * 1e9:.2f} ns/element); load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'pass':<38} {'ms':>8} {'ns/elem':>8} {'x floor':>8}")
    for name, t in rows:
        print(f"{name:<38} {t * 1e3:>8.1f} {t / n * 1e9:>8.2f} {t / floor:>8.1f}")
    ties_total = 2 * rows[0][1] + rows[1][1]
    dare_total = 2 * rows[2][1] + rows[3][1]
    print(
        f"{'ties total (2 x pass 1 + pass 2)':<38} {ties_total * 1e3:>8.1f} {ties_total / n * 1e9:>8.2f} "
        f"{ties_total / floor:>8.1f}"
    )
    print(f"{'dare_ties total':<38} {dare_total * 1e3:>8.1f} {dare_total / n * 1e9:>8.2f} {dare_total / floor:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
