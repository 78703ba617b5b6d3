"""Split a JSONL of your own into three disjoint lm-eval tasks: search, validation and held-out.

    evomerge tasks split data/mine.jsonl --name mine --out my_tasks                # generation, exact match
    evomerge tasks split data/mine.jsonl --name mine_mc --out my_tasks --kind choice  # multiple choice
    evomerge tasks split qa.jsonl --name qa --out my_tasks --prompt question --answer gold --sizes 200,100,rest

(`python scripts/split_tasks.py ...` in a clone runs the same.)

Reads one JSON object per line (`prompt` and `answer` by default; `--kind choice` also `choices`, a list, with the
answer as the right choice's text or index) and writes, under OUT:

    data/NAME_search.jsonl, data/NAME_val.jsonl, data/NAME_heldout.jsonl     the three splits
    NAME_search.yaml, NAME_val.yaml, NAME.yaml                                their lm-eval tasks

The split is deterministic and never lets a prompt into two splits: examples are grouped by prompt (repeated prompts
stay together) and the groups ordered by sha256(seed, prompt), so the same file (in any line order) and seed give
the same splits; the first `search` groups are the search split, the next `validation` the validation split, the
rest held out. `--sizes S,V,H` counts groups (H may be `rest`); the default is fractions 0.4, 0.2 and 0.4.

Task kinds: `generate` (default) is `generate_until` scored by exact match of the generated text (surrounding
whitespace ignored), generation stopped at `--until` (default a newline) or `--max-gen-toks`; `choice` is
`multiple_choice` (acc, acc_norm), the model's loglikelihood of each choice after the prompt. Prompts are used as
written, so put any separator (`Answer:`) in them; `--delimiter` goes between prompt and answer (default "").

Exit 2 with one line `evomerge: error: FILE:LINE: ...` for input it cannot split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from evomerge.errors import ConfigError

SPLITS = (("search", "_search"), ("validation", "_val"), ("heldout", ""))


class SplitError(ConfigError):
    """Bad input: the message names the file (and line) and the fix."""


def read_examples(path: Path, prompt: str, answer: str, choices: str | None) -> list[dict]:
    """The file's examples as {prompt, answer[, choices, label]} (label: the right choice's index)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SplitError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise SplitError(f"{path}:{number}: not JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(doc, dict):
            raise SplitError(f"{path}:{number}: a line is one JSON object, got {type(doc).__name__}")
        for field in (prompt, answer) + ((choices,) if choices else ()):
            if field not in doc:
                raise SplitError(f"{path}:{number}: no field {field!r}; name yours with --prompt/--answer/--choices")
        row = {"prompt": str(doc[prompt]), "answer": doc[answer]}
        if choices:
            row.update(_choice(path, number, doc[choices], doc[answer]))
        else:
            row["answer"] = str(row["answer"])
        rows.append(row)
    if not rows:
        raise SplitError(f"{path}: no examples; write one JSON object per line")
    return rows


def _choice(path: Path, number: int, options, answer) -> dict:
    if not isinstance(options, list) or len(options) < 2:
        raise SplitError(f"{path}:{number}: choices must be a list of at least two answers")
    options = [str(c) for c in options]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise SplitError(f"{path}:{number}: answer index {answer} is not among the {len(options)} choices")
        label = answer
    elif str(answer) in options:
        label = options.index(str(answer))
    else:
        raise SplitError(f"{path}:{number}: answer {answer!r} is not one of the choices; give its text or index")
    return {"answer": options[label], "choices": options, "label": label}


def split(rows: list[dict], sizes: tuple[float, float, float | None], seed: int) -> dict[str, list[dict]]:
    """{search, validation, heldout: rows}: prompt groups ordered by sha256(seed, prompt), cut at `sizes` (group
    counts, or fractions when every size is below 1; None: the rest)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row)
    order = sorted(groups, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).hexdigest())
    n = len(order)
    fractions = all(s is None or s < 1 for s in sizes)
    counts = [round(s * n) if fractions else int(s) for s in sizes[:2] if s is not None]
    if sum(counts) >= n:
        raise SplitError(
            f"{n} distinct prompts cannot fill search {counts[0]} and validation {counts[1]} and leave a held-out "
            "split; lower --sizes or add examples"
        )
    if min(counts) < 1:
        raise SplitError(f"{n} distinct prompts: a split would be empty; raise --sizes or add examples")
    cuts = [0, counts[0], counts[0] + counts[1]]
    end = n if sizes[2] is None else cuts[2] + (round(sizes[2] * n) if fractions else int(sizes[2]))
    if end > n:
        raise SplitError(f"{n} distinct prompts cannot fill the held-out size {sizes[2]}; lower --sizes")
    bounds = [(cuts[0], cuts[1]), (cuts[1], cuts[2]), (cuts[2], end)]
    return {name: [row for p in order[a:b] for row in groups[p]] for (name, _), (a, b) in zip(SPLITS, bounds)}


def task_yaml(task: str, data_file: str, kind: str, split_name: str, args: argparse.Namespace) -> str:
    """One lm-eval task over one split's JSONL (fields prompt, answer[, choices, label])."""
    head = [
        f"# {task}: {split_name} split of {args.source.name} ({kind}); written by evomerge tasks split",
        f"# Run: evomerge eval MODEL_DIR --tasks {task} --include-path {args.out}",
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data_file}",
        "test_split: test",
        "doc_to_text: prompt",
        f"target_delimiter: {json.dumps(args.delimiter)}",
    ]
    if kind == "choice":
        body = [
            "output_type: multiple_choice",
            "doc_to_choice: choices",
            "doc_to_target: label",
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        ]
    else:
        until = json.dumps(args.until or ["\n"])
        body = [
            "output_type: generate_until",
            "doc_to_target: answer",
            "generation_kwargs:",
            f"  until: {until}",
            f"  max_gen_toks: {args.max_gen_toks}",
            "  do_sample: false",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            '    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]',
        ]
    return "\n".join(head + body + ["metadata:", "  version: 1.0", ""])


def write(parts: dict[str, list[dict]], args: argparse.Namespace) -> list[str]:
    """The three JSONLs and task YAMLs under args.out; returns the task names (search, validation, held-out)."""
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    names = []
    for (split_name, suffix), rows in zip(SPLITS, parts.values()):
        task = f"{args.name}{suffix}"
        jsonl = f"data/{args.name}_{'val' if split_name == 'validation' else split_name}.jsonl"
        (args.out / jsonl).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        (args.out / f"{task}.yaml").write_text(task_yaml(task, jsonl, args.kind, split_name, args), "utf-8")
        names.append(task)
    return names


def _sizes(text: str) -> tuple[float, float, float | None]:
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        values = [float(p) for p in parts[:2]] + [None if parts[2].strip() == "rest" else float(parts[2])]
        if any(v is not None and v <= 0 for v in values):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give three sizes, e.g. 200,100,rest or 0.4,0.2,0.4") from None
    return values[0], values[1], values[2]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="FILE.jsonl", help="your examples, one JSON object per line")
    parser.add_argument("--name", required=True, help="task name stem: NAME_search, NAME_val, NAME (held-out)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the task YAMLs and data/ (--include-path)")
    parser.add_argument("--kind", choices=("generate", "choice"), default="generate", help="default: generate")
    parser.add_argument("--prompt", default="prompt", help="field of the prompt (default: prompt)")
    parser.add_argument("--answer", default="answer", help="field of the answer (default: answer)")
    parser.add_argument("--choices", default="choices", help="field of the choices, --kind choice (default: choices)")
    parser.add_argument("--sizes", type=_sizes, default=(0.4, 0.2, 0.4), help="S,V,H prompts or fractions")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (default 0)")
    parser.add_argument("--until", action="append", help="stop generating at this text (repeatable; default: newline)")
    parser.add_argument("--max-gen-toks", type=int, default=64, help="longest generated answer (default 64 tokens)")
    parser.add_argument("--delimiter", default="", help="text between prompt and answer (default: none)")


def run(args: argparse.Namespace) -> int:
    """Split, write, and print what was written; SplitError (exit 2) for input it cannot split."""
    if not args.name.replace("_", "").replace("-", "").isalnum():
        raise SplitError(f"--name {args.name!r}: use letters, digits, - and _")
    rows = read_examples(args.source, args.prompt, args.answer, args.choices if args.kind == "choice" else None)
    parts = split(rows, args.sizes, args.seed)
    names = write(parts, args)
    for task, (split_name, _), rows in zip(names, SPLITS, parts.values()):
        print(f"{task}: {split_name}, {len(rows)} examples ({len({r['prompt'] for r in rows})} prompts)")
    print(f"tasks written to {args.out}; use them with --include-path {args.out} (search config: tasks.include_paths)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python scripts/split_tasks.py ...`: the same as `evomerge tasks split ...`."""
    parser = argparse.ArgumentParser(
        prog="split_tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure(parser)
    try:
        return run(parser.parse_args(argv))
    except SplitError as exc:
        print(f"split_tasks: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["SplitError", "configure", "main", "read_examples", "run", "split"]
