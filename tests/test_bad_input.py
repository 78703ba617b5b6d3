"""Bad input, every way we know: exit 2, ONE line naming the file and field (or path) and the fix, nothing written.

Each case builds its bad input in a temp folder and returns the CLI argv; `CASES` is also what
`scripts/bad_input_messages.py` runs to print every message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

Build = Callable[[Path, Path], list[str]]  # (tmp folder, tiny zoo) -> argv


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    expect: str  # a substring of the one-line message
    around: Callable[[], ContextManager] | None = None  # e.g. a file-size limit while the command runs
    skip: str | None = None
    xfail: str | None = None  # a known gap in code another engineer owns (reported), until it is fixed
    leaves: str | None = None  # a glob of files the command may leave (a study lock next to an existing study)
    in_tmp: bool = False  # run the command with the temp folder as the current directory (`search` writes runs/ there)


# ---- building blocks ----------------------------------------------------------------------------


def recipe(
    tmp: Path,
    zoo: Path,
    *,
    method: str = "ties",
    params: str = "{weight: 1, density: 0.5}",
    models: tuple[str, ...] = ("add", "reverse"),
    base: str | None = "base",
    extra: str = "",
) -> list[str]:
    """A recipe next to the models (relative paths), and `merge RECIPE --out tmp/out`."""

    def path(name: str) -> str:
        return name if "/" in name or name.startswith(".") else str(zoo / name)

    lines = [f"merge_method: {method}", f"parameters: {params}"]
    if base is not None:
        lines.append(f"base_model: {path(base)}")
    lines.append("models:")
    lines += [f"- model: {path(m)}" for m in models]
    return write_recipe(tmp, "\n".join(lines) + "\n" + extra)


def write_recipe(tmp: Path, text: str, *extra_args: str) -> list[str]:
    (tmp / "recipe.yaml").write_text(text)
    return ["merge", str(tmp / "recipe.yaml"), "--out", str(tmp / "out"), *extra_args]


def broken(edit: Callable[[Path], None], *, role: str = "model") -> Build:
    """Copy zoo/add to tmp/broken, damage it with `edit`, merge it as a model (or as the base)."""

    def build(tmp: Path, zoo: Path) -> list[str]:
        folder = tmp / "broken"
        shutil.copytree(zoo / "add", folder)
        edit(folder)
        if role == "base":
            return recipe(tmp, zoo, base="./broken", models=("add", "reverse"))
        return recipe(tmp, zoo, models=("./broken", "reverse"))

    return build


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"))

    return apply


def edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return apply


def corrupt_header(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"#" * 20 + data[28:])


def truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def to_pickle(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def swap_two_tokens(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def drop_last_layer(folder: Path) -> None:
    edit_json("config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] - 1))(folder)
    last = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    edit_tensors(lambda t: [t.pop(k) for k in list(t) if f".layers.{last}." in k])(folder)


def exported(edit: Callable[[Path], None]) -> Build:
    """A real export in tmp/ckpt, damaged by `edit`, then `verify tmp/ckpt`."""

    def build(tmp: Path, zoo: Path) -> list[str]:
        from evomerge.export.export import export_recipe
        from evomerge.merge.recipe import Recipe

        recipe(tmp, zoo)
        export_recipe(Recipe.load(tmp / "recipe.yaml"), tmp / "ckpt")
        edit(tmp / "ckpt")
        return ["verify", str(tmp / "ckpt")]

    return build


def flip_a_byte(folder: Path) -> None:
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))


def out_parent_is_file(tmp: Path, zoo: Path) -> list[str]:
    argv = recipe(tmp, zoo)
    (tmp / "afile").write_text("not a folder")
    return argv[:-1] + [str(tmp / "afile" / "out")]


def out_read_only(tmp: Path, zoo: Path) -> list[str]:
    argv = recipe(tmp, zoo)
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return argv[:-1] + [str(tmp / "ro" / "out")]


def out_not_ours(tmp: Path, zoo: Path) -> list[str]:
    argv = recipe(tmp, zoo)
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("precious")
    return argv


@contextlib.contextmanager
def small_disk(limit: int = 16_384) -> Iterator[None]:
    """A full disk, cheaply: writes past `limit` bytes in any file fail (EFBIG) while the command runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def audit_config(
    tmp: Path, zoo: Path, text: str | None = None, models: tuple[str, ...] = ("add", "reverse")
) -> list[str]:
    if text is None:
        text = f"base_model: {zoo / 'base'}\nmodels:\n" + "".join(
            f"- model: {m if '/' in m else zoo / m}\n" for m in models
        )
    (tmp / "audit.yaml").write_text(text)
    return ["audit", str(tmp / "audit.yaml")]


def eval_model(folder_edit: Callable[[Path], None] | None, tasks: str = "zoo_add") -> Build:
    def build(tmp: Path, zoo: Path) -> list[str]:
        folder = tmp / "model"
        shutil.copytree(zoo / "add", folder)
        if folder_edit is not None:
            folder_edit(folder)
        return ["eval", str(folder), "--tasks", tasks]

    return build


def search_config(tmp: Path, zoo: Path, storage: str | None = "store/study.db", **changes) -> list[str]:
    """`search tmp/search.yaml`: the tiny zoo, task arithmetic, no Ray (workers.count 0); `changes` replace keys.

    Run with the temp folder as the current directory (`in_tmp`), so runs/<name>/ would land there (and fail the test).
    """
    import yaml

    data = {
        "name": "bad",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search", "metric": "acc", "subset": 8}]},
        "sampler": {"name": "cmaes", "seed": 0},
        "budget": {"n_trials": 1},
        "workers": {"count": 0},
        **({"storage": f"sqlite:///{tmp / storage}"} if storage else {}),
        **changes,
    }
    (tmp / "search.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return ["search", str(tmp / "search.yaml"), "--no-progress"]


INLINE_SPACE = {
    "methods": ["task_arithmetic"],
    "layers_per_group": 2,
    "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}, "lambda": {"value": 1.0}},
}


def weight_bounds(low: float, high: float) -> dict:
    space = json.loads(json.dumps(INLINE_SPACE))
    space["parameters"]["weight"].update(low=low, high=high)
    return space


def broken_task_folder(tmp: Path, zoo: Path) -> list[str]:
    (tmp / "mytasks").mkdir()
    (tmp / "mytasks" / "my_task.yaml").write_text("task: my_task\ndataset_path: [json\noutput_type: {\n")
    return search_config(
        tmp, zoo, tasks={"include_paths": [str(tmp / "mytasks")], "search": [{"name": "my_task", "metric": "acc"}]}
    )


def storage_under_a_file(tmp: Path, zoo: Path) -> list[str]:
    (tmp / "afile").write_text("not a folder")
    return search_config(tmp, zoo, storage="afile/sub/study.db")


def study_exists_with_other_config(tmp: Path, zoo: Path) -> list[str]:
    """A study 'bad' made with seed 0 (opened as the driver does, no trials run), then `search` with seed 1."""
    from evomerge.candidate.space import space_of
    from evomerge.config.schema import load_config
    from evomerge.study import study as st

    search_config(tmp, zoo)
    cfg = load_config(tmp / "search.yaml")
    st.open_study(cfg, space_of(cfg), log=None)
    return search_config(tmp, zoo, seed=1)


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ---- the cases ----------------------------------------------------------------------------------

CASES = [
    # recipes
    Case(
        "recipe_missing", lambda t, z: ["merge", str(t / "nope.yaml"), "--out", str(t / "out")], "recipe file not found"
    ),
    Case("malformed_yaml", lambda t, z: write_recipe(t, "merge_method: [ties\nmodels: {"), "is not valid YAML"),
    Case("not_a_mapping", lambda t, z: write_recipe(t, "- ties\n- add\n"), "a recipe is a YAML mapping"),
    Case("unknown_top_key", lambda t, z: recipe(t, z, extra="out_dtyp: float16\n"), "did you mean: out_dtype"),
    Case(
        "unknown_nested_key",
        lambda t, z: write_recipe(
            t, f"merge_method: linear\nmodels:\n- model: {z / 'add'}\n  paramters: {{weight: 1}}\n"
        ),
        "did you mean: parameters",
    ),
    Case("unknown_parameter", lambda t, z: recipe(t, z, params="{weight: 1, densty: 0.5}"), "did you mean: density"),
    Case(
        "wrong_type_models",
        lambda t, z: write_recipe(t, "merge_method: linear\nmodels: add\n"),
        "field models: Input should be a valid list",
    ),
    Case(
        "wrong_type_value",
        lambda t, z: recipe(t, z, params="{weight: heavy, density: 0.5}"),
        "'heavy' is not a valid weight",
    ),
    Case("wrong_type_seed", lambda t, z: recipe(t, z, extra="evomerge: {seed: abc}\n"), "field evomerge.seed"),
    Case("unknown_method", lambda t, z: recipe(t, z, method="tie"), "unknown method 'tie' (did you mean: ties"),
    Case(
        "density_above_1",
        lambda t, z: recipe(t, z, params="{weight: 1, density: 1.5}"),
        "density must be in (0, 1], got 1.5",
    ),
    Case(
        "density_zero", lambda t, z: recipe(t, z, params="{weight: 1, density: 0}"), "density must be in (0, 1], got 0"
    ),
    Case(
        "t_above_1",
        lambda t, z: recipe(t, z, method="slerp", params="{t: 1.2}", models=("add",)),
        "t must be in [0, 1], got 1.2",
    ),
    Case(
        "t_in_gradient",
        lambda t, z: recipe(t, z, method="slerp", params="{t: [0, 0.5, -0.1]}", models=("add",)),
        "t must be in [0, 1], got -0.1",
    ),
    Case("base_model_needed", lambda t, z: recipe(t, z, base=None), "field base_model: ties needs a base model"),
    # models
    Case("model_dir_missing", lambda t, z: recipe(t, z, models=("./nowhere", "reverse")), "field models[0].model"),
    Case("model_dir_empty", broken(lambda f: [p.unlink() for p in f.iterdir()]), "config.json: missing"),
    Case("no_weights", broken(lambda f: (f / "model.safetensors").unlink()), "no weights found"),
    Case("base_dir_missing", lambda t, z: recipe(t, z, base="./nobase"), "field base_model:"),
    Case(
        "model_is_a_hub_id",
        lambda t, z: recipe(t, z, models=("me/tiny-add", "reverse")),
        "me/tiny-add is not a local folder (looked for",
    ),  # a published recipe: `hf download me/tiny-add ...`
    Case("corrupt_header", broken(corrupt_header), "corrupt safetensors header"),
    Case("truncated_weights", broken(truncate), "truncated"),
    Case(
        "shape_differs",
        broken(edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:7]}))),
        "model.norm.weight has shape [7]",
    ),
    Case(
        "tensor_missing",
        broken(edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))),
        "model.layers.1.mlp.up_proj.weight is missing",
    ),
    Case(
        "tensor_renamed",
        broken(edit_tensors(lambda t: t.update({"model.extra.weight": t.pop("model.norm.weight")}))),
        "tensor model.norm.weight is missing",
    ),
    Case("vocab_differs", broken(edit_json("tokenizer.json", swap_two_tokens)), "tokenizer vocabulary differs"),
    Case(
        "model_type_differs",
        broken(edit_json("config.json", lambda c: c.update(model_type="mistral"))),
        "config.json model_type is mistral, but",
    ),
    Case("num_layers_differ", broken(drop_last_layer), "num_hidden_layers is 3, but"),
    Case(
        "config_differs_tensors_match",
        broken(edit_json("config.json", lambda c: c.update(intermediate_size=512))),
        "intermediate_size is 512, but",
    ),
    Case(
        "slices_lengths_differ",
        lambda t, z: write_recipe(
            t,
            (
                f"merge_method: slerp\nbase_model: {z / 'add'}\nparameters: {{t: 0.5}}\nslices:\n- sources:\n"
                f"  - {{model: {z / 'add'}, layer_range: [0, 4]}}\n  - "
                f"{{model: {z / 'reverse'}, layer_range: [0, 3]}}\n"
            ),
        ),
        "spans 3 layers but sources[0] spans 4",
    ),
    Case(
        "slices_past_last_layer",
        lambda t, z: write_recipe(
            t, (f"merge_method: passthrough\nslices:\n- sources:\n  - {{model: {z / 'add'}, layer_range: [2, 6]}}\n")
        ),
        "reaches past the 4 layers",
    ),
    Case(
        "modules_form",
        lambda t, z: write_recipe(
            t, f"merge_method: linear\nmodules:\n  text:\n    models:\n    - model: {z / 'add'}\n"
        ),
        "field 'modules'",
    ),
    Case("base_incompatible", broken(drop_last_layer, role="base"), "layers"),
    Case("pickle_weights", broken(to_pickle), "--allow-pickle"),
    # outputs
    Case("out_parent_is_file", out_parent_is_file, "afile is a file, not a folder"),
    Case(
        "out_read_only",
        out_read_only,
        "choose a writable output folder",
        skip="running as root: permission bits do not bind (out_parent_is_file covers the failed mkdir)"
        if _as_root()
        else None,
    ),
    Case("out_not_ours", out_not_ours, "is not an evomerge output"),
    Case("disk_full", lambda t, z: recipe(t, z), "free disk space", around=small_disk),
    Case("bad_shard_size", lambda t, z: recipe(t, z) + ["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
    # kernel sets
    Case(
        "unknown_kernel_set",
        lambda t, z: recipe(t, z, extra="evomerge: {kernels: fast}\n"),
        "recipe.yaml: field evomerge.kernels: unknown kernel set 'fast'; valid: evomerge-1, mergekit-0.1.5",
    ),
    Case("unknown_kernels_flag", lambda t, z: recipe(t, z) + ["--kernels", "mk"], "--kernels: unknown kernel set 'mk'"),
    Case(
        "unknown_kernels_env",
        lambda t, z: recipe(t, z),
        "environment variable EVOMERGE_KERNELS: unknown kernel set",
        around=lambda: env_var("EVOMERGE_KERNELS", "fast"),
    ),
    Case(
        "export_unknown_kernels",
        lambda t, z: ["export", str(t / "runs" / "x"), "--kernels", "evomerge-2"],
        "--kernels: unknown kernel set 'evomerge-2'",
    ),
    # verify
    Case("verify_no_recipe", lambda t, z: ["verify", str(z / "add")], "recipe.yaml: missing"),
    Case("verify_tampered", exported(flip_a_byte), "model.safetensors: sha256"),
    Case("verify_file_missing", exported(lambda f: (f / "config.json").unlink()), "config.json: missing"),
    Case("verify_extra_weights", exported(lambda f: (f / "extra.safetensors").write_bytes(b"x")), "not recorded"),
    # eval
    Case("eval_model_missing", lambda t, z: ["eval", str(t / "nowhere"), "--tasks", "zoo_add"], "does not exist"),
    Case("eval_pickle_only", eval_model(to_pickle), "no *.safetensors"),
    Case("eval_corrupt_header", eval_model(corrupt_header), "corrupt"),
    Case("eval_unknown_task", eval_model(None, tasks="zoo_ad"), "zoo_ad"),
    # audit
    Case("audit_malformed_yaml", lambda t, z: audit_config(t, z, "base_model: [x\n"), "YAML"),
    Case(
        "audit_model_missing", lambda t, z: audit_config(t, z, models=(str(t / "nowhere"), "reverse")), "does not exist"
    ),
    # (vocabularies that differ are no longer bad input for audit: it reports them, tests/test_vocab.py)
    Case(
        "audit_probe_recipe",
        lambda t, z: (
            (t / "recipe.yaml").write_text(
                f"merge_method: linear\nmodels:\n- model: {z / 'add'}\n  parameters: {{weight: 1.0}}\n"
            ),
            ["audit", str(t / "recipe.yaml"), "--probe"],
        )[1],
        "this is a recipe",
    ),
    Case("audit_probe_without_tasks", lambda t, z: audit_config(t, z) + ["--probe"], "tasks"),
    Case(
        "audit_probe_subset_zero",
        lambda t, z: ["audit", search_config(t, z)[1], "--probe", "--probe-subset", "0"],
        "--probe-subset 0",
    ),
    # search configs (each fails before Ray starts and before runs/<name>/ is made)
    Case(
        "search_num_gpus_without_a_gpu",  # the plan refuses it: Ray would wait for a GPU forever
        lambda t, z: search_config(t, z, workers={"count": 1, "num_gpus": 1}),
        "workers.num_gpus: 1 GPU(s) per worker, but this machine has no GPU",
        around=lambda: env_var("CUDA_VISIBLE_DEVICES", ""),
        in_tmp=True,
    ),
    Case(
        "search_num_gpus_not_whole",
        lambda t, z: search_config(t, z, workers={"count": 1, "num_gpus": 1.5}),
        "whole GPUs",
        in_tmp=True,
    ),
    Case(
        "search_unknown_sampler",
        lambda t, z: search_config(t, z, sampler={"name": "cmaess"}),
        "did you mean: cmaes",
        in_tmp=True,
    ),
    Case(
        "search_unknown_task",
        lambda t, z: search_config(t, z, tasks={"search": [{"name": "zoo_ad_search"}]}),
        "zoo_ad_search",
        in_tmp=True,
    ),
    Case(
        "search_builtin_task",
        lambda t, z: search_config(t, z, tasks={"search": [{"name": "arc_easy"}]}),
        "`tasks.include_defaults: true` in a search config",
        in_tmp=True,
    ),
    Case(
        "search_unknown_metric",
        lambda t, z: search_config(t, z, tasks={"search": [{"name": "zoo_add_search", "metric": "accc"}]}),
        "no metric 'accc'",
        in_tmp=True,
    ),
    Case(
        "search_two_unknown_metrics",  # both reported, so one pass fixes the config
        lambda t, z: search_config(
            t,
            z,
            tasks={
                "search": [
                    {"name": "zoo_add_search", "metric": "accc"},
                    {"name": "zoo_reverse_search", "metric": "acd"},
                ]
            },
        ),
        "no metric 'accc'; valid: acc",
        in_tmp=True,
    ),
    Case(
        "search_method_misspelt",  # reported against the field the user wrote, not the search space it defaults
        lambda t, z: search_config(t, z, method="task-arithmetic", search_space=None),
        "search.yaml: 'method': unknown merge method 'task-arithmetic' (did you mean: task_arithmetic",
        in_tmp=True,
    ),
    Case(
        "search_negative_trials",
        lambda t, z: search_config(t, z, budget={"n_trials": -3}),
        "search.yaml: field 'budget.n_trials': -3 is out of range; set it to a number greater than 0",
        in_tmp=True,
    ),
    Case(
        "search_storage_unreachable",  # nothing listens on port 9: the config file and field, in seconds
        lambda t, z: search_config(t, z, storage=None) + ["--storage", "postgresql://evomerge@127.0.0.1:9/x"],
        "'storage': 'postgresql://evomerge@127.0.0.1:9/x' cannot be reached",
        in_tmp=True,
    ),
    Case(
        "search_bounds_inverted",
        lambda t, z: search_config(t, z, search_space=weight_bounds(0.9, 0.1)),
        "must be below `high`",
        in_tmp=True,
    ),
    Case(
        "search_bound_out_of_range",
        lambda t, z: search_config(
            t,
            z,
            method="ties",
            search_space={
                "methods": ["ties"],
                "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.5}},
            },
        ),
        "keep density within (0, 1]",
        in_tmp=True,
    ),
    Case("search_storage_unopenable", storage_under_a_file, "cannot be opened", in_tmp=True),
    Case(
        "search_unknown_kernels",
        lambda t, z: search_config(t, z, kernels="mergekit-0.1.4"),
        "'kernels': unknown kernel set 'mergekit-0.1.4'",
        in_tmp=True,
    ),
    Case("search_broken_task_yaml", broken_task_folder, "my_task", in_tmp=True),
    Case(
        "search_study_config_changed",
        study_exists_with_other_config,
        "different config (seed differ)",
        in_tmp=True,
        leaves="store/*.lock",
    ),
]


@contextlib.contextmanager
def working_dir(folder: Path):
    """`contextlib.chdir`, which Python 3.10 (allowed by pyproject) lacks."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_case(case: Case, tmp: Path, zoo: Path) -> tuple[int, str, str]:
    """Build the case in `tmp`, run the CLI in-process: (exit code, stdout, stderr)."""
    from evomerge.cli import main

    argv = case.build(tmp, zoo)
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        working_dir(tmp) if case.in_tmp else contextlib.nullcontext(),
    ):
        with case.around() if case.around else contextlib.nullcontext():
            code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _tree(folder: Path) -> dict[str, tuple]:
    """Every file's size and mtime; a SQLite database by its contents (its dump, read through a read-only
    connection), its WAL and shared-memory files left out: any connection's close may checkpoint the WAL into the
    database file, and any reader writes its read marks to `-shm`, without a row changing."""
    out: dict[str, tuple] = {}
    for p in folder.rglob("*"):
        if p.is_symlink() or p.name.endswith(("-shm", "-wal")):
            continue
        rel = str(p.relative_to(folder))
        if p.suffix == ".db" and p.is_file():
            conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                out[rel] = ("sqlite", hashlib.sha256("\n".join(conn.iterdump()).encode()).hexdigest())
            finally:
                conn.close()
        else:
            out[rel] = (p.stat().st_size, p.stat().st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: Case, tiny_zoo, tmp_path, request):
    if case.skip:
        pytest.skip(case.skip)
    if case.xfail:
        request.applymarker(pytest.mark.xfail(reason=case.xfail, strict=True))
    work = tmp_path / "work"
    work.mkdir()
    snapshot: dict[str, tuple] = {}
    build = case.build

    def build_and_snapshot(t: Path, z: Path) -> list[str]:
        argv = build(t, z)
        snapshot.update(_tree(t))
        return argv

    code, out, err = run_case(dataclasses.replace(case, build=build_and_snapshot), work, tiny_zoo)
    err = err.strip()
    assert code == 2, (code, err)
    assert err.startswith("evomerge: error: ") and "\n" not in err, err
    assert case.expect in err, err
    after = _tree(work)
    if case.leaves:
        after = {
            k: v for k, v in after.items() if not (work / k).match(case.leaves) and k != str(Path(case.leaves).parent)
        }
        snapshot = {k: v for k, v in snapshot.items() if k != str(Path(case.leaves).parent)}
    assert after == snapshot  # nothing written, nothing left behind


def test_every_task_with_an_unknown_metric_is_named(tiny_zoo, tmp_path):
    case = next(c for c in CASES if c.name == "search_two_unknown_metrics")
    code, _, err = run_case(case, tmp_path, tiny_zoo)
    assert (
        code == 2 and "zoo_add_search has no metric 'accc'" in err and "zoo_reverse_search has no metric 'acd'" in err
    )


def test_an_unreachable_storage_server_fails_within_its_connect_timeout(tiny_zoo, tmp_path):
    """A server that does not answer (a non-routable address: the connect waits) fails in the driver's connect
    timeout, before any task loads, naming the config file and its `storage` field."""
    import time

    from evomerge.study.storage import CONNECT_TIMEOUT_S

    case = Case(
        "storage_silent",
        lambda t, z: search_config(t, z, storage=None) + ["--storage", "postgresql://evomerge@10.255.255.1:5432/x"],
        "",
        in_tmp=True,
    )
    started = time.monotonic()
    code, _, err = run_case(case, tmp_path, tiny_zoo)
    assert code == 2 and "search.yaml: 'storage':" in err and "cannot be reached" in err, err
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 5
