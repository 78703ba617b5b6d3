"""What Iso-C's flat spectrum does to a zoo's task vectors: per weight-matrix kind, each model's numerical rank and
how much Iso-C keeps of the summed task vector's top direction.

    .venv/bin/python bench/iso_spectrum.py ZOO                # a zoo folder (zoo.json): its base and specialists
    .venv/bin/python bench/iso_spectrum.py ZOO --layers 18-29 # only these decoder layers

Iso-C (merge/kernels/subspace.py `iso_c`, the paper's Sec. 4.1 and its reference code) replaces the summed task
vector U S V^T of a weight matrix by sigma_bar U V^T, sigma_bar the mean of all min(m, n) singular values. Where
every task vector is full rank (the papers' fully fine-tuned ViTs) the top directions keep a fair share; where they
are low rank (LoRA adapters: rank r, so the sum has at most T r non-zero values) or a full fine-tune's task vector
is mostly small noise directions, sigma_bar is a small fraction of sigma_1: the directions that carry the skills
shrink by sigma_1 / sigma_bar and the null directions gain sigma_bar each. Printed per matrix kind, as the mean
over the layers: each model's numerical rank (singular values above 1e-4 of its largest), and for the sum at
weight 1: sigma_1, sigma_bar, their ratio (what lambda must be to give the top direction back its own value), and
the sum's numerical rank. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def numerical_rank(values, rel: float = 1e-4) -> int:
    return int((values > rel * values[0]).sum()) if float(values[0]) > 0 else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zoo", type=Path)
    p.add_argument("--layers", default="", help="FIRST-LAST decoder layers (default: every layer)")
    args = p.parse_args()
    import torch

    from evomerge.candidate.space import LLAMA_PROJECTIONS
    from evomerge.io.inputs import open_inputs

    torch.set_num_threads(1)
    manifest = json.loads((args.zoo / "zoo.json").read_text())
    names = list(manifest["specialists"])
    base_ref = str(args.zoo / manifest["base"])
    opened = open_inputs([base_ref, *[str(args.zoo / n) for n in names]], base_model=base_ref)
    base, models = opened[base_ref], [opened[str(args.zoo / n)] for n in names]
    n_layers = 1 + max(int(t.split(".")[2]) for t in base.tensor_names() if t.startswith("model.layers."))
    first, last = map(int, args.layers.split("-")) if args.layers else (0, n_layers - 1)
    start = time.perf_counter()
    print(f"{args.zoo}: {', '.join(names)}; layers {first}-{last}; weight 1 each; means over the layers")
    print("| matrix | " + " | ".join(f"rank {n}" for n in names) + " | rank of sum | sigma_1 | sigma_bar | ratio |")
    print("|---|" + "---:|" * (len(names) + 4))
    for kind in LLAMA_PROJECTIONS:
        rows = []
        for layer in range(first, last + 1):
            name = f"model.layers.{layer}.{kind}.weight"
            if name not in base.tensor_names():
                continue
            w0 = base.get(name).float()
            taus = [m.get(name).float() - w0 for m in models]
            ranks = [numerical_rank(torch.linalg.svdvals(t)) for t in taus]
            s = torch.linalg.svdvals(sum(taus))
            rows.append((*ranks, numerical_rank(s), float(s[0]), float(s.mean())))
        if not rows:
            continue
        cols = [statistics.fmean(c) for c in zip(*rows)]
        ratio = cols[-2] / cols[-1] if cols[-1] > 0 else float("inf")
        ranks = " | ".join(f"{c:.0f}" for c in cols[: len(names) + 1])
        print(f"| {kind} | {ranks} | {cols[-2]:.3f} | {cols[-1]:.4f} | {ratio:.0f}x |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
