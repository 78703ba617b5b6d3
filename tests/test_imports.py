"""The package's import graph: no cycle (imports inside functions included), every module imports alone, and the
light entry points (the CLI's parser, a config) import none of the heavy libraries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "evomerge"
HEAVY = ("torch", "optuna", "ray", "lm_eval", "transformers", "mergekit", "matplotlib")


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The evomerge modules `name` imports anywhere in its file (module level, in functions, in methods), each
    with the packages above it (importing `a.b.c` runs `a/b/__init__.py` first). Blocks under `if TYPE_CHECKING:`
    never run and are left out; so are the importer's own packages, which are initialized before it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    edges = set()
    for target in found:
        if not target.startswith("evomerge"):
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules and not (name == candidate or name.startswith(candidate + ".")):
                edges.add(candidate)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's cycles, each as its sorted modules; [] when it has none. graphlib reports one cycle at a time,
    so each found cycle has one of its edges dropped and the search repeats."""
    remaining = {node: set(edges) for node, edges in graph.items()}
    found: list[list[str]] = []
    while True:
        try:
            TopologicalSorter(remaining).prepare()
            return found
        except CycleError as err:
            cycle = err.args[1]  # [n0, n1, ..., n0]: consecutive nodes are joined by an edge
            found.append(sorted(set(cycle)))
            a, b = cycle[0], cycle[1]
            remaining.get(a, set()).discard(b)
            remaining.get(b, set()).discard(a)


# docs/architecture.md's layers, bottom first: a module imports only its own layer or the ones below. A module
# belongs to the layer of its longest listed prefix; a package is listed whole unless one of its modules sits
# elsewhere, and each such module is named with the reason it cannot sit with its package.
LAYERS = [
    ("foundation", ["evomerge", "evomerge.errors", "evomerge.tables", "evomerge.resources", "evomerge.threads",
                    "evomerge.offline", "evomerge.storage_url", "evomerge.stats", "evomerge.interrupts",
                    "evomerge.tasksplit"]),
    ("files", ["evomerge.io"]),
    ("merge", ["evomerge.merge"]),
    # io.verify checks a written merge against its recipe: it reads the recipe's own types
    ("recipes", ["evomerge.merge.recipe", "evomerge.merge.plan", "evomerge.merge.materialize",
                 "evomerge.merge.portability", "evomerge.io.verify"]),
    ("scoring", ["evomerge.scoring"]),
    ("candidate", ["evomerge.candidate"]),
    # the Optuna layer's tables and queries; the schema validates a sampler's name against samplers.SAMPLERS
    ("study records", ["evomerge.study"]),
    # data only, but it validates names against the registries below it (methods, samplers, tasks, the space)
    ("config", ["evomerge.config"]),
    # study.study creates a study from a config (its hash, directions, baselines)
    ("study", ["evomerge.study.study"]),
    ("refine", ["evomerge.refine"]),
    # the resolution asks the refiners whether a config's arms apply (rows' memory, distill's owners)
    ("resolved config", ["evomerge.config.resolve"]),
    ("capacity", ["evomerge.capacity"]),
    ("run", ["evomerge.run"]),
    ("validate", ["evomerge.validate"]),
    ("report", ["evomerge.report", "evomerge.analysis"]),
    ("export", ["evomerge.export"]),
    ("tools", ["evomerge.zoo"]),
    ("the CLI", ["evomerge.commands", "evomerge.cli", "evomerge.__main__"]),
]  # fmt: skip


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest listed prefix of `module` (a package's modules are in its layer)."""
    best, layer = "", -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, layer = name, i
    return layer


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    fake = tmp_path / "evomerge" / "a.py"
    fake.parent.mkdir()
    fake.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evomerge.b import X\n"
        "def f():\n    from evomerge.c import y\n    import evomerge.d.e\n"
    )
    modules = {"evomerge", "evomerge.a", "evomerge.b", "evomerge.c", "evomerge.d", "evomerge.d.e"}
    assert imports_of("evomerge.a", fake, modules) == {"evomerge.c", "evomerge.d", "evomerge.d.e"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_counting_imports_inside_functions():
    modules = module_names()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    assert len(graph) > 50 and graph["evomerge.merge.recipe"] >= {"evomerge.merge.methods"}  # function-level too
    assert cycles(graph) == []


def test_every_import_respects_the_layers():
    """docs/architecture.md's layers: every module is in one, and none imports a module of a layer above its own."""
    modules = module_names()
    assert [m for m in modules if layer_of(m) < 0] == [], "add these modules to a layer (and to docs/architecture.md)"
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for name, path in modules.items()
        for dep in sorted(imports_of(name, path, set(modules)))
        if layer_of(dep) > layer_of(name)
    ]
    assert upward == []


def test_the_layer_rule_catches_an_upward_import():
    assert layer_of("evomerge.run.driver") > layer_of("evomerge.config.schema") > layer_of("evomerge.study.record")
    assert layer_of("evomerge.io.verify") == layer_of("evomerge.merge.recipe") > layer_of("evomerge.io.checkpoint")
    assert layer_of("evomerge.merge.kernels.gta") == layer_of("evomerge.merge.registry")


def private_imports(name: str, path: Path) -> list[str]:
    """The private names (`_x`, not dunders) `name` imports from another evomerge module, anywhere in its file: a
    private name is its module's own, so another module that needs it needs it public."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("evomerge") and not node.level:
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and node.module != name:
                    found.append(f"{name} imports {alias.name} from {node.module}")
    return found


def test_no_private_name_is_imported_from_another_module(tmp_path):
    fake = tmp_path / "a.py"
    fake.write_text("from evomerge.b import _hidden, shown\nfrom evomerge import __version__\n")
    assert private_imports("evomerge.a", fake) == ["evomerge.a imports _hidden from evomerge.b"]
    found = [line for name, path in module_names().items() for line in private_imports(name, path)]
    assert found == [], "make these names public (no leading underscore) where they are defined"


def test_every_module_imports_alone_and_the_light_entry_points_stay_light():
    """Each module imported with no other evomerge module loaded (third-party modules stay cached, so this runs
    in one interpreter in seconds; `__main__` runs the CLI, so it is left out), then the CLI's parser and a
    shipped config loaded in a fresh interpreter."""
    script = f"""
import importlib, json, sys
failed = {{}}
for name in {sorted(m for m in module_names() if not m.endswith("__main__"))!r}:
    for loaded in [m for m in sys.modules if m == "evomerge" or m.startswith("evomerge.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps(failed))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}

    light = f"""
import json, sys
from pathlib import Path
import yaml
from evomerge.cli import build_parser
from evomerge.config.schema import parse_config
build_parser()
demo = Path("configs/demo.yaml")
parse_config(yaml.safe_load(demo.read_text()), str(demo), Path("configs"), check_files=False)
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
"""
    out = subprocess.run([sys.executable, "-c", light], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# Ray is imported by the pool module only; each other module that must is named here with its reason.
RAY_MODULES = {
    "evomerge.run.pool": "the pools of Ray actors (and joining or starting Ray)",
    "evomerge.capacity.devices": "the cluster probe: a task pinned to each node reads that node's memory and GPUs",
}


def ray_importers(path: Path) -> bool:
    """Whether the file imports Ray anywhere (module level, in functions, under TYPE_CHECKING too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray" and not node.level:
            return True
    return False


def test_ray_is_imported_only_by_the_pool_and_the_named_exceptions(tmp_path):
    fake = tmp_path / "a.py"
    fake.write_text("def f():\n    from ray.util import get_node_ip_address\n")
    assert ray_importers(fake)
    found = {name for name, path in module_names().items() if ray_importers(path)}
    assert found == set(RAY_MODULES), "import Ray in evomerge/run/pool.py, or name the exception and its reason"


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, also under `if`/`try`), not
    those it imports."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body])

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def reexported_imports(path: Path, modules: dict[str, Path]) -> list[str]:
    """`from evomerge.m import name` where module `m` (not a package's __init__, whose curated names are its
    own) does not define `name` and has no submodule of that name: a second route to a name defined elsewhere."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level or node.module not in modules:
            continue
        source = modules[node.module]
        if source.name == "__init__.py":
            continue
        defined = defined_names(source)
        found += [f"{path.name}: {a.name} from {node.module}" for a in node.names if a.name not in defined]
    return found


def test_every_name_is_imported_from_the_module_that_defines_it(tmp_path):
    modules = module_names()
    fake = tmp_path / "a.py"
    fake.write_text("from evomerge.study.study import load_study\nfrom evomerge.study.storage import load_study\n")
    assert reexported_imports(fake, modules) == ["a.py: load_study from evomerge.study.study"]
    files = [p for folder in ("evomerge", "tests", "scripts", "bench") for p in sorted((REPO / folder).rglob("*.py"))]
    found = [line for path in files for line in reexported_imports(path, modules)]
    assert found == [], "import these names from the modules that define them"
