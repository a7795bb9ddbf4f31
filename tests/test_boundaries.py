"""No module imports another's private names.

ruff's SLF001 (in CI) catches `obj._private`; this catches the other way in,
`from module import _private`, for the project's own modules: a name another
module needs is part of its public surface and is named so.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("cloudlet", "edge_agent", "mobile_client", "fuzz", "tests", "benchmarks",
            "examples")


def private_imports(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            found += [f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}"
                      for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 100
    assert [hit for p in files for hit in private_imports(p)] == []


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from cloudlet.vm.snapshot import _hidden, public\nfrom os import _exit\n")
    assert private_imports(probe, tmp_path) == ["probe.py:1: cloudlet.vm.snapshot._hidden"]
