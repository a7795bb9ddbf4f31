"""The README's and docs' examples must run as written: docs that drift from the code
are a bug. tests/test_docs_examples.py runs every example against a live metro; this
module checks, without one, that every example is run or skipped with a reason, the
rules by which a console block's shown output is compared, and the CI command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.doc_examples import blocks, doc_paths, output_matches, shell_commands


def test_every_example_is_run_or_skipped_with_a_reason() -> None:
    found = [b for path in doc_paths(ROOT) for b in blocks(ROOT, path) if b.is_example]
    assert any(b.path == "README.md" and b.lang == "python" for b in found)
    problems = [f"{b.id}: {b.problem()}" for b in found if b.problem()]
    assert not problems, "\n".join(problems)


MARKED = """\
Intro.

<!-- example: skip -->
```sh
rm -rf /
```

<!-- example: skip — needs a second machine -->
```sh
ssh other cloudlet up
```

  <!-- example: shape -->
  ```console
  $ cloudlet vm run x.wasm \\
      --call "kv_put 1 2"
  1
  $ cloudlet status
  ```

```bash
echo unmarked
```

<!-- example: sometimes -->
```python
print(1)
```

```
a diagram
```
"""


def test_blocks_markers_and_problems(tmp_path: Path) -> None:
    (tmp_path / "x.md").write_text(MARKED)
    found = blocks(tmp_path, "x.md")
    assert [b.id for b in found] == ["x.md:L4", "x.md:L9", "x.md:L14", "x.md:L21",
                                     "x.md:L26", "x.md:L30"]
    no_reason, reasoned, shaped, bash, unknown, diagram = found
    assert no_reason.problem() == "'example: skip' needs a reason"
    assert reasoned.problem() is None and reasoned.reason == "needs a second machine"
    assert shaped.marker == "shape" and shaped.problem() is None
    assert shell_commands(shaped) == [('cloudlet vm run x.wasm --call "kv_put 1 2"', ["1"]),
                                      ("cloudlet status", [])]
    assert bash.problem() is None and bash.marker is None  # bash runs as sh
    assert "unknown marker" in (unknown.problem() or "")
    assert not diagram.is_example and diagram.problem() is None


def test_an_unknown_language_is_neither_run_nor_let_through(tmp_path: Path) -> None:
    (tmp_path / "x.md").write_text("```pycon\n>>> 1\n```\n")
    (block,) = blocks(tmp_path, "x.md")
    assert block.is_example and "is not run" in (block.problem() or "")


@pytest.mark.parametrize(("shown", "actual", "shape", "ok"), [
    (["1", "x:"], "1\nx:\n", False, True),
    (["1", "x:"], "1\nx:\nmore\n", False, False),
    (["10"], "11\n", False, False),
    (["10"], "11\n", True, True),
    (["a", "..."], "a\nb\nc\n", False, True),
    (["a", "…", "z"], "a\nb\nz\n", False, True),
    (["image   sha256:1149…"], "image sha256:114927271f04\n", False, True),
    (["latency 64.28 ms on downtown  # an aside"], "latency 3.1 ms on harbor\n", True, True),
    (["latency 64.28 ms on downtown"], "latency 3.1 ms in harbor\n", True, False),
    (["VM 4182220a3273b1a6 ok"], "VM 9f00aa11bb22cc33 ok\n", True, True),
    (["VM 4182220a3273b1a6 ok"], "VM 9f00aa11bb22cc33 ok\n", False, False),
])
def test_shown_output(shown: list[str], actual: str, shape: bool, ok: bool) -> None:
    assert output_matches(shown, actual, shape=shape) is ok


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("apt-get update") and "pytest" in ci
    assert f"```sh\n{ci}\n```" in readme, "the README's test command and .ci/run differ"
