"""The README's examples must run as written: docs that drift from the code are a bug."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README lost its Python example"
    (tmp_path / "workloads").symlink_to(ROOT / "workloads")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLOUDLET_HOME", str(tmp_path / "home"))
    for block in blocks:
        if "await " in block:
            # Needs a running daemon and a token: checked for syntax here; the same
            # calls run for real in tests/test_daemon.py.
            body = "".join(f"    {line}\n" for line in block.splitlines())
            compile("async def _example():\n" + body, "README.md", "exec")
            continue
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "base.snap").exists()
    assert os.listdir(tmp_path / "home" / "images")


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("apt-get update") and "pytest" in ci
    assert f"```sh\n{ci}\n```" in readme, "the README's test command and .ci/run differ"
