"""Print the one-line message of every bad-input case in tests/test_bad_input.py (`case: message`).

.venv/bin/python scripts/bad_input_messages.py [ZOO_DIR]     # ZOO_DIR: a tiny zoo (built there if missing)
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_cases():
    spec = importlib.util.spec_from_file_location("bad_input_cases", REPO / "tests" / "test_bad_input.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from evomerge.offline import go_offline

    go_offline()
    zoo = Path(sys.argv[1] if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "evomerge-tiny-zoo")
    if not (zoo / "zoo.json").is_file():
        from evomerge.zoo.build import build_zoo

        print(f"building a tiny zoo in {zoo} ...", file=sys.stderr)
        build_zoo(zoo, size="tiny", log=None)
    cases = load_cases()
    for case in cases.CASES:
        if case.skip:
            print(f"{case.name}: (skipped: {case.skip})")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                code, _, err = cases.run_case(case, Path(tmp), zoo)
            except Exception as exc:  # noqa: BLE001 - a crash is what this script exists to show
                code, err = 1, f"CRASH {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        message = err.strip().removeprefix("evomerge: error: ")
        known = f" [known gap: {case.xfail}]" if case.xfail else ""
        print(f"{case.name}: {message}" if code == 2 else f"{case.name}: UNEXPECTED exit {code}: {err.strip()}{known}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
