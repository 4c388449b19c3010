"""The house, read from the code itself: the root shows the method, support/ imports nothing from it, imports flow one
way with no circle and none hidden in a function, lines are ruff's, and nothing points outside the repository."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository


def tracked():
    """The repository's files (git's list where it is a clone, else every file but the ignored build outputs)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "outputs", "runs", ".whl", "__pycache__", ".pytest_cache", ".ruff_cache"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


PY = [p for p in tracked() if p.suffix == ".py"]
ROOT_MODULES = {p.stem for p in ROOT.glob("*.py")}
PROJECT = ROOT_MODULES | {"support", "bench"}


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports(path, in_functions=None):
    """(line, imported project module) of every import in `path`; in_functions True: only those inside a function
    body, False: only those outside any function, None: all. `from support import cli` imports support.cli."""
    tree, found = ast.parse(path.read_text()), []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            deeper = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_functions in (None, inside):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if isinstance(child, ast.ImportFrom) and child.module in ("support", "bench"):
                    names = [f"{child.module}.{a.name}" for a in child.names]
                found.extend((child.lineno, n) for n in names if n.split(".")[0] in PROJECT)
            visit(child, deeper)

    visit(tree, False)
    return found


def test_the_root_shows_the_method():
    """At most 20 entries at the root (dot-folders and dot-files aside): the five scripts, their siblings, README,
    requirements, pyproject.toml, conftest.py and test_smoke.py, tests/, prompts/, docs/, examples/, support/ and
    bench/."""
    top = sorted({p.relative_to(ROOT).parts[0] for p in tracked() if not p.relative_to(ROOT).parts[0].startswith(".")})
    assert len(top) <= 20, top
    assert {"rollout.py", "reward.py", "grpo.py", "train.py", "evaluate.py", "test_smoke.py", "README.md"} <= set(top)
    assert {"support", "tests", "prompts"} <= set(top) and not [p for p in top if p.startswith("test_")][1:]


def test_support_imports_nothing_from_the_root():
    found = [
        (p.name, line, m)
        for p in PY
        if p.parent.name == "support"
        for line, m in imports(p)
        if m.split(".")[0] not in ("support",)
    ]
    assert not found, f"support/ must import nothing from the root: {found}"


def test_no_project_module_is_imported_inside_a_function():
    """Outside the tests every project import sits at the top of its module: none hidden in a function to dodge a
    circle."""
    code = [p for p in PY if p.parts[len(ROOT.parts)] != "tests" and p.name not in ("conftest.py", "test_smoke.py")]
    found = [(p.relative_to(ROOT).as_posix(), line, m) for p in code for line, m in imports(p, in_functions=True)]
    assert len(code) > 30 and not found, found


def test_imports_flow_one_way_with_no_circle():
    """The module-level imports among the project's modules form no cycle; grpo.py imports none of them, and nothing
    imports train.py but distill.py and bench (the scripts built on its loop) and the tests."""
    code = [p for p in PY if p.parts[len(ROOT.parts)] != "tests" and p.name not in ("conftest.py", "test_smoke.py")]
    names = {module_name(p): p for p in code}
    graph = {m: {n for _, n in imports(p, in_functions=False) if n in names and n != m} for m, p in names.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", f"import circle: {' -> '.join([*path, n])}"
            if n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert graph["grpo"] == set()
    assert {m for m, deps in graph.items() if "train" in deps} <= {
        "distill",
        "bench.steps",
        "bench.levers",
        "bench.loop",
    }
    assert all(not n.startswith("bench") for m, deps in graph.items() if not m.startswith("bench") for n in deps)


def test_lines_are_ruffs_and_no_line_passes_120_characters():
    long = [
        (p.relative_to(ROOT).as_posix(), i + 1)
        for p in PY
        for i, line in enumerate(p.read_text().splitlines())
        if len(line) > 120
    ]
    assert not long, long
    ruff = shutil.which("ruff") or next((p for p in (Path(sys.executable).with_name("ruff"),) if p.exists()), None)
    if ruff is None:
        pytest.skip("ruff is not installed (requirements.txt installs it; .ci/run runs it)")
    for args in (["format", "--check", "."], ["check", "."]):
        out = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout}{out.stderr}"


def test_nothing_refers_to_a_path_outside_the_repository():
    """A clone is all there is: no relative path in the code or the docs leaves the repository."""
    found = []
    for p in tracked():
        if p.suffix in (".py", ".md", ".txt", ".toml", "") and p.stat().st_size < 2**20:
            text = p.read_text(errors="replace")
            for ref in re.findall(r"(?<![\w.])((?:\.\./)+[\w.-]*)", text):
                if not (p.parent / ref).resolve().is_relative_to(ROOT):
                    found.append((p.relative_to(ROOT).as_posix(), ref))
    assert not found, found
