"""Where do two specialists' task vectors collide, and could a per-layer recipe route around it?

    OMP_NUM_THREADS=2 .venv/bin/python bench/interference.py --zoo zoo
    .venv/bin/python bench/interference.py --zoo /tmp/z --models add,reverse --include-path /tmp/tasks

For specialists A and B (task vectors tA, tB against the base; each scored on its own held-out task) and
each region r of the network (one layer, all attention, all MLP, embeddings, head), every figure is a real
merge recipe (task arithmetic with `filter:` weights), applied in memory and scored:
- "A without its vector in r": A's accuracy with its own task vector removed in r (a large drop: A needs r);
- "A + B's vector in r": A's accuracy with B's task vector added in r only (a large drop: B hurts A there);
and the same with A and B swapped. A region is a *conflict* when both models need it: any recipe must give
up part of one skill there. It is *routable* when one model's vector hurts the other there but is not
needed by its own model: a per-layer search can drop it. Two controls ask whether the harm is specific
to the other skill or would come from any change of that size: the other task vector shuffled within
each tensor, and Gaussian noise with its per-tensor norms. Prints a markdown table of accuracy changes
(points) against each specialist alone. About 2 minutes on the demo zoo (2 cores).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

NEED, HARM = 10.0, 5.0  # points of accuracy: "needs" a region / "hurts" in a region


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", default="zoo", help="a folder with base/ and the two specialists")
    p.add_argument("--models", default="add,reverse", help="the two specialists; each scored on zoo_<name>")
    p.add_argument("--include-path", action="append", default=[], help="another task folder (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from evomerge.offline import go_offline

    go_offline()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from evomerge.merge.materialize import Materializer
    from evomerge.recipe import ModelEntry, Recipe
    from evomerge.scoring import Scorer, TaskSpec

    zoo = Path(args.zoo).resolve()
    names = args.models.split(",")
    if len(names) != 2:
        raise SystemExit("bench/interference.py: --models takes exactly two specialists, e.g. add,reverse")
    base, paths = str(zoo / "base"), [str(zoo / n) for n in names]
    tasks = [f"zoo_{n}" for n in names]
    mat = Materializer(paths, base)
    scorer = Scorer([TaskSpec(name=t) for t in tasks], include_paths=args.include_path, seed=args.seed)
    layers = mat.model.config.num_hidden_layers
    regions = [f"layers.{i}." for i in range(layers)] + ["self_attn", "mlp", "embed_tokens", "lm_head"]

    def score() -> list[float]:
        raw = scorer.score(mat.model, mat.tokenizer)
        return [100 * raw[t]["acc"] for t in tasks]

    def apply(weights: list) -> list[float]:
        mat.apply(Recipe(merge_method="task_arithmetic", base_model=base,
                         models=[ModelEntry(model=m, parameters={"weight": w}) for m, w in zip(paths, weights)]))  # fmt: skip
        return score()

    def only(r: str) -> list[dict]:
        return [{"filter": r, "value": 1.0}, {"value": 0.0}]

    def without(r: str) -> list[dict]:
        return [{"filter": r, "value": 0.0}, {"value": 1.0}]

    alone = [apply([1.0, 0.0]), apply([0.0, 1.0])]
    own = [alone[0][0], alone[1][1]]
    both = apply([1.0, 1.0])
    controls = [_control(mat, names, i, kind, args.seed, score) for i in (0, 1) for kind in ("shuffled", "noise")]

    a, b = names
    print(f"# interference: {a} vs {b} ({zoo})\n")
    print(f"- {a} alone: {a} {own[0]:.1f}; {b} alone: {b} {own[1]:.1f}")
    print(f"- task arithmetic, both at weight 1: {a} {both[0]:.1f}, {b} {both[1]:.1f}")
    for i, (x, y) in enumerate(((a, b), (b, a))):
        print(f"- {x} + {y}'s vector shuffled within each tensor: {x} {controls[2 * i]:.1f}; "
              f"+ Gaussian noise of its per-tensor norms: {x} {controls[2 * i + 1]:.1f}")  # fmt: skip
    print(f"\n| region r | {a} without its vector in r | {a} + {b}'s vector in r | {b} without its vector in r "
          f"| {b} + {a}'s vector in r | verdict |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|")
    counts = {"conflict": 0, "routable": 0, "quiet": 0}
    for r in regions:
        need_a = own[0] - apply([without(r), 0.0])[0]
        hurt_a = own[0] - apply([1.0, only(r)])[0]
        need_b = own[1] - apply([0.0, without(r)])[1]
        hurt_b = own[1] - apply([only(r), 1.0])[1]
        verdict = _verdict(need_a, hurt_a, need_b, hurt_b)
        counts[verdict.split()[0]] += 1
        print(f"| {r.rstrip('.')} | {-need_a:+.1f} | {-hurt_a:+.1f} | {-need_b:+.1f} | {-hurt_b:+.1f} | {verdict} |")
    print(f"\nRegions: {counts['conflict']} conflict, {counts['routable']} routable, {counts['quiet']} quiet "
          f"(a model 'needs' a region when removing its vector there costs >= {NEED:.0f} points; a vector 'hurts' "
          f"at >= {HARM:.0f} points). Figures are changes in held-out accuracy, in points.")  # fmt: skip


def _verdict(need_a: float, hurt_a: float, need_b: float, hurt_b: float) -> str:
    if need_a >= NEED and need_b >= NEED and max(hurt_a, hurt_b) >= HARM:
        return "conflict (both need it)"
    if (hurt_a >= HARM and need_b < NEED) or (hurt_b >= HARM and need_a < NEED):
        return "routable"
    return "quiet"


def _control(mat, names: list[str], i: int, kind: str, seed: int, score) -> float:
    """Model i's accuracy on its task with the other's task vector replaced by a same-size unrelated change."""
    import torch

    from evomerge.merge.materialize import tensor_seed

    ckpts = {c.path.name: c for c in mat.checkpoints}
    base, mine, other = ckpts["base"], ckpts[names[i]], ckpts[names[1 - i]]
    params = mat.model.state_dict()
    with torch.no_grad():
        for name in base.tensor_names():
            if name not in params:
                continue
            b = base.get(name).float()
            delta = other.get(name).float() - b
            g = torch.Generator().manual_seed(tensor_seed(seed, name))
            if kind == "shuffled":
                change = delta.flatten()[torch.randperm(delta.numel(), generator=g)].view_as(delta)
            else:
                noise = torch.randn(delta.shape, generator=g)
                change = noise * (delta.norm() / noise.norm().clamp_min(1e-12))
            params[name].copy_(mine.get(name).float() + change)
    return score()[i]


if __name__ == "__main__":
    main()
