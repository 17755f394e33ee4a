"""The layout is the architecture: no import cycles (lazy imports included), one module per CLI verb, the README's
layout matches the tree, and the score terms are listed in one place."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from cxr_oneclass.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "cxr_oneclass"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node, except what sits under `if TYPE_CHECKING:` (imports for type hints never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo += child.orelse
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its body (function-level imports count: they hide cycles,
    they do not remove them). `from . import x` names the submodule x when there is one."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in mods:
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                edges |= set(subs) if subs else {target}
                if subs and len(subs) < len(node.names):
                    edges.add(target)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "cxr_oneclass.scoring.terms" in graph["cxr_oneclass.config"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# Each module is imported first in a fresh process forked from one that has loaded only third-party libraries (so
# torch is imported once, not once per module): an import that works only after another package module was
# loaded fails here.
ALONE = """
import importlib, os, sys, traceback
import numpy, torch, sklearn.metrics, PIL.Image, matplotlib, safetensors.torch, tqdm  # third-party only
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", *failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    r = subprocess.run([sys.executable, "-c", ALONE, *names], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_every_cli_verb_lives_in_its_own_jobs_module():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    verbs = set(sub.choices)
    assert {"train", "evaluate", "rescore", "score", "export", "demo", "experiment", "report"} <= verbs
    for verb in verbs:
        assert (PKG / "jobs" / f"{verb}.py").is_file(), f"cxr-oneclass {verb}: no jobs/{verb}.py"


def test_the_readme_layout_names_every_module_and_folder():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.name in ("__init__.py", "__main__.py", "_version.py"):
            continue
        assert rel.stem in layout, f"README layout does not mention {rel}"
    for folder in ("model/", "scoring/", "training/", "data/", "jobs/", "research/", "tools/", "benchmarks/"):
        assert folder in layout, folder
    for mentioned in re.findall(r"\b(\w+)\.py\b", layout):
        assert list(PKG.rglob(f"{mentioned}.py")) or list(ROOT.glob(f"*/{mentioned}.py")), f"README names {mentioned}.py"


TERM_WORDS = {"rec", "adv", "enc", "ssim", "fdist", "seg", "sdist"}


def test_score_terms_are_listed_only_in_the_term_table():
    """No tuple, list, set or dict literal outside scoring/terms.py is a list of term names (two or more, nothing
    else; the training losses share three names but list other things too): adding a term touches the table and its
    test, nothing else that lists terms."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path == PKG / "scoring" / "terms.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
            words = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            if len(words) >= 2 and words <= TERM_WORDS:
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} {sorted(words)}")
    assert not offenders, offenders


def test_the_readme_python_api_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"), "CXR_ONECLASS_CACHE": "off"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and (tmp_path / "runs" / "api-example" / "model.safetensors").is_file()
    assert lines[1].startswith("array[0] ") and lines[1].split()[1] in ("normal", "abnormal")
    assert lines[2].startswith("no-such-file.png error None {}")


def test_one_version_source_and_packaging_files():
    import importlib.metadata

    import cxr_oneclass

    assert importlib.metadata.version("cxr-oneclass") == cxr_oneclass.__version__
    assert (PKG / "py.typed").is_file() and "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
