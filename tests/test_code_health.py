"""The house rules, checked like any behaviour: lint, strict types on the core packages, layers
that never import upwards, no import cycles (function-level imports included), the run topic
built in one place."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "detransformer_edge"
pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (scripts/setup.sh test)")
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    done = _run(_tool("ruff"), "check", "detransformer_edge", "tests", "bench", "scripts")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_on_the_core_packages() -> None:
    done = _run(_tool("mypy"), "detransformer_edge/transport", "detransformer_edge/protocol", "detransformer_edge/planner",
                "detransformer_edge/model", "detransformer_edge/parallel")
    assert done.returncode == 0, done.stdout + done.stderr


def test_layers_never_import_upwards() -> None:
    done = _run(_tool("lint-imports"), "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_import_cycles_not_even_inside_functions() -> None:
    import grimp

    # imports under ``if TYPE_CHECKING`` are annotations only: they never run, so never cycle
    graph = grimp.build_graph("detransformer_edge", cache_dir=None, exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module != imported and graph.chain_exists(imported, module):
                cycles.append(f"{module} <-> {imported}")
    assert not cycles, "import cycles: " + "; ".join(cycles[:10])


def test_the_run_topic_is_built_in_one_place() -> None:
    hits = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
            if re.search(r'"P/run|/run/(?!netns)', p.read_text(encoding="utf-8"))}  # not /run/netns/
    assert hits == {"detransformer_edge/protocol/topics.py"}, hits


def test_modules_and_classes_stay_small() -> None:
    """Split along the seams when one grows: no module of the package over 500 lines, no class
    over 300 (a newcomer reads a module in one sitting)."""
    import ast

    big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 500:
            big.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > 300:
                    big.append(f"{name}: class {node.name} {length} lines")
    assert not big, big
