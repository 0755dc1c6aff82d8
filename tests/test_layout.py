"""The package layout: layers, sizes, import cycles, private-API confinement, self-contained docs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lanczos_grad_gp"
MODULES = sorted(p for p in PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported by ``path`` at module level (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in tree.body:  # module level only: imports inside functions are deliberate deferrals
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("lanczos_grad_gp"):
                out.add(mod)
                for alias in node.names:  # "from . import settings" names a module
                    out.add(f"{mod}.{alias.name}")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lanczos_grad_gp")}
    known = {_module_name(p) for p in MODULES}
    return {m for m in out if m in known and m != name}


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p) for p in MODULES}
    # a package's __init__ importing its own submodules is not a cycle of the layering
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if not d.startswith(mod + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_core_imports_no_gpytorch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gpytorch' or name.startswith('gpytorch.'):\n"
        "            raise ImportError('gpytorch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util, types\n"
        "pkg = types.ModuleType('lanczos_grad_gp')\n"
        f"pkg.__path__ = [{str(PKG)!r}]\n"
        "sys.modules['lanczos_grad_gp'] = pkg\n"
        "import lanczos_grad_gp.core.engine, lanczos_grad_gp.core.preconditioners, lanczos_grad_gp.core.probes\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


PRIVATE = re.compile(
    r"\._linear_op\b|\._diag_tensor\b|torch\._C\b|_validate_sample|_differentiable_kwargs|_nondifferentiable_kwargs"
    r"|(?<!super\(\))\.(_matmul|_bilinear_derivative|_get_indices|_diagonal|_expand_batch|_transpose_nonbatch)\("
)


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "_compat.py"], ids=lambda p: _module_name(p))
def test_private_api_only_in_compat(path):
    hits = [
        f"{i + 1}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines())
        if PRIVATE.search(line) and not line.lstrip().startswith(("#", "def ", "``")) and "``" not in line
    ]
    assert not hits, hits


def test_docs_are_self_contained():
    """Nothing cites the design note outside the repository; the cited docs page exists."""
    offenders = []
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *PKG.rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        text = path.read_text()
        if re.search(r"DESIGN\s*§|shared/DESIGN", text) and path.name != "test_layout.py":
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
    assert (ROOT / "docs" / "mathematics.md").exists()
