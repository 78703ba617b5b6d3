"""`evomerge verify DIR`: check an exported checkpoint against the sha256 recorded in DIR/recipe.yaml.

evomerge verify out/merged          # exit 0: "ok" and one line per file; exit 2 names the first bad file
evomerge verify runs/demo/best      # an export folder: checks its model/ subfolder
"""

from __future__ import annotations

import argparse

EXAMPLES = """\
  evomerge verify runs/demo/best             # an export folder: checks its model/ subfolder
  evomerge verify /tmp/merged                # a `evomerge merge --out` folder
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by `evomerge merge --out` or `evomerge export`")


def run(args: argparse.Namespace) -> int:
    from evomerge.io.verify import checkpoint_folder, verify_checkpoint

    checked = verify_checkpoint(args.folder)
    for name, digest in checked:
        print(f"ok  {name}  sha256:{digest}")
    print(f"ok: all {len(checked)} files in {checkpoint_folder(args.folder)} match their recorded sha256")
    return 0
