"""`evomerge merge RECIPE.yaml --out DIR [--seed N] [--kernels SET] [--max-shard-size 2GB] [--allow-pickle]
[--allow-config-mismatch] [--unsafe-truncate-embeddings]`

Materializes any recipe (mergekit YAML with `models:` or `slices:`, optionally an `evomerge:` block) to an HF
checkpoint.
DIR appears whole or not at all; `evomerge verify DIR` checks it later against the hashes in DIR/recipe.yaml.
The kernel set is the recipe's (`evomerge.kernels`), else $EVOMERGE_KERNELS, else evomerge-1; `--kernels`
overrides it, and DIR/recipe.yaml records the set used. What the recipe has that evomerge accepts and ignores, as
mergekit does (a parameter its method does not read), is one `evomerge: warning: ...` line each.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

EXAMPLES = """\
  evomerge merge /tmp/ties.yaml --out /tmp/merged --seed 0
  evomerge merge runs/demo/best/recipe.yaml --out /tmp/again     # reproduces the export byte for byte
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="mergekit-style recipe (inputs: local folders)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder (replaced atomically)")
    parser.add_argument("--seed", type=int, default=None, help="seed for random masks (default: the recipe's, else 0)")
    parser.add_argument(
        "--kernels",
        default=None,
        metavar="SET",
        help="kernel set: evomerge-1 or mergekit-0.1.5 (default: the recipe's evomerge.kernels, "
        "else $EVOMERGE_KERNELS, else evomerge-1)",
    )
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="largest weight file (default 2GB)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt inputs (unpickled weights-only)")
    parser.add_argument(
        "--allow-config-mismatch",
        action="store_true",
        help="merge models whose config.json differ in shape-defining fields (hidden size, layers, "
        "heads, vocabulary, architecture) when their tensors match",
    )
    parser.add_argument(
        "--unsafe-truncate-embeddings",
        action="store_true",
        help="merge embeddings and heads of different vocabulary sizes by keeping the first rows, as many as the "
        "smallest has (mergekit's option; assumes shared token ids: tokenizer_source aligns by token instead)",
    )


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from evomerge.export.export import export_recipe
    from evomerge.io.shards import parse_size
    from evomerge.merge.recipe import Recipe

    start = time.perf_counter()
    shard_bytes = parse_size(args.max_shard_size)
    with printed_warnings():
        recipe = Recipe.load(args.recipe)
        if args.kernels is not None:
            recipe = recipe.with_provenance(kernels=kernels_flag(args.kernels))
        out = export_recipe(
            recipe,
            Path(args.out),
            seed=args.seed,
            allow_pickle=args.allow_pickle,
            shard_bytes=shard_bytes,
            source=args.recipe,
            allow_config_mismatch=args.allow_config_mismatch,
            truncate_embeddings=args.unsafe_truncate_embeddings,
        )
    seed = args.seed if args.seed is not None else recipe.seed
    print(
        f"merged {recipe.merge_method} of {len(recipe.input_models())} models (seed {seed}, kernels {recipe.kernels}) "
        f"to {out} in {time.perf_counter() - start:.1f} s"
    )
    recorded = recipe.evomerge.inputs if recipe.evomerge is not None else {}
    now = Recipe.load(out / "recipe.yaml").evomerge.inputs
    for model, digest in recorded.items():
        if model in now and now[model] != digest:
            print(
                f"evomerge: warning: {model}: weights differ from the sha256 recorded in {args.recipe}; "
                "the result differs from the checkpoint that recipe describes",
                file=sys.stderr,
            )
    return 0


@contextmanager
def printed_warnings() -> Iterator[None]:
    """Each RecipeWarning raised inside, printed once as `evomerge: warning: ...` on stderr (others pass through)."""
    import sys
    import warnings

    from evomerge.errors import RecipeWarning

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always", RecipeWarning)
            try:
                yield
            finally:
                caught = list(recorded)
    finally:  # outside the recording: passing a warning on inside it would record it again, without end
        seen = set()
        for w in caught:
            if not issubclass(w.category, RecipeWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in seen:
                seen.add(str(w.message))
                print(f"evomerge: warning: {w.message}", file=sys.stderr)


def kernels_flag(value: str) -> str:
    """`--kernels VALUE` as a recorded kernel-set name; exit 2 naming the flag and the valid names."""
    from evomerge.errors import ConfigError
    from evomerge.merge.kernels import canonical_kernels

    try:
        return canonical_kernels(value)
    except ValueError as exc:
        raise ConfigError(f"--kernels: {exc}") from None
