"""Every example in README.md and docs/*.md runs, as printed, against a live metro.

A new user found that the README's examples did not work as written: docs that drift
from the code are a bug, so CI runs them. One `cloudlet up` (the venv's, as a real
process, on free ports, its state in a temporary HOME) serves the whole module; each
block is one test, named by its fence's line (`README.md:L113`).

The convention, for authors of README.md and docs/*.md:

- Examples are the fenced blocks in ```sh (also bash, shell), ```console and
  ```python. Blocks without a language (diagrams, layouts) and ```text, toml, yaml,
  json, ini, diff, mermaid are not examples. Any other language fails
  (tests/test_readme.py checks this without a metro).
- The world an example sees is a user's who followed the README: `.venv/bin` first on
  PATH, a fresh HOME (so `~/.cache/cloudlet` is empty but for the metro's state in
  `~/.cache/cloudlet/metro`, the default), the working directory a scratch directory
  in which the repository's top-level entries (workloads/, configs/, examples/, ...)
  are visible, and `CLOUDLET_BROKER` set to the metro's broker as the README tells a
  user whose broker is not on the default port. The metro's default addresses in an
  example (`127.0.0.1:1883`, `127.0.0.1:8601`-`8603`) mean the test's metro, which
  runs on free ports: they are rewritten to its ports before the block runs.
- sh: every line is a command (a trailing `\\` continues it; `#` lines are prose) and
  must exit 0; output is not checked. console: every `$ CMD` line is a command, and
  the lines after it (up to the next `$`) its shown output, stdout and stderr
  together. The shown output must match exactly, except: a trailing `  # comment` is
  an aside; a line of only `...`/`…` stands for any lines; `…` in a line for any text;
  nothing shown checks nothing. A command whose shown output is
  `cloudlet: error [CODE]: ...` must fail with it (exit 1) instead.
- Shell state carries over like one terminal reading the docs top to bottom: every
  variable a command sets (`export CLOUDLET_TOKEN=$(cloudlet token --client demo)`,
  `VM=$(...)`) and its working directory hold for the next commands and blocks.
- python: run for real in this process, with the shell's variables as its
  environment; the blocks of one file share one namespace in order (like a REPL
  following the page), and a block with top-level `await` runs in an asyncio runner.
- Markers, an HTML comment on the line just before the opening fence:
  `<!-- example: skip — REASON -->`: not run; the reason is required (what the test
  cannot do: install on a fresh machine, run for minutes, a second machine; and where
  the same thing is tested instead).
  `<!-- example: shape -->` (console): numbers, hex ids and the metro's cloudlet names
  in the shown output match any of their kind; the words and layout must match.
  `<!-- example: background -->`: the block is one long-running command, started, let
  run until its output matches the shown lines (by shape), then stopped with SIGINT.
- A block that is neither run nor skipped with a reason fails, as does an unknown
  marker: a new example cannot go untested.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.doc_examples import (
    SHELL_LANGS,
    Block,
    blocks,
    doc_paths,
    output_matches,
    shell_commands,
)
from tests.metro import NODES, free_port_run

pytestmark = pytest.mark.slow

VENV_BIN = ROOT / ".venv" / "bin"
READY_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 60.0      # the slowest example (a small simulation) takes ~4 s
BACKGROUND_WAIT_S = 20.0
# Entries of the repository an example must not see through the scratch directory:
# writing there (out/, a.snap) must not touch the working tree.
HIDDEN = frozenset({".git", "out", "sim-out", "emulate-out"})
# Bash's own bookkeeping, not the user's state.
SHELL_VARS = frozenset({"_", "SHLVL", "PWD", "OLDPWD"})

EXAMPLES = [b for path in doc_paths(ROOT) for b in blocks(ROOT, path) if b.is_example]


@dataclass
class Terminal:
    """One user's shell across all blocks: its variables and working directory."""
    env: dict[str, str]
    cwd: Path
    scratch: Path
    rewrites: dict[str, str]
    up_output: str
    python_namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rewrite(self, text: str) -> str:
        for default, actual in self.rewrites.items():
            text = text.replace(default, actual)
        return text

    def run(self, command: str) -> tuple[int, str]:
        """Run one command as the user would type it; keep what it changed."""
        env_file, cwd_file = self.scratch / ".env-after", self.scratch / ".cwd-after"
        # allexport: a plain `VM=$(...)` holds for later commands, as in a terminal.
        # pipefail: `VM=$(cloudlet vm create ... | cut ...)` fails when the create does.
        script = (f"set -a -o pipefail\n{command}\n__rc=$?\nset +a\n"
                  f"env -0 > {env_file}\npwd > {cwd_file}\nexit $__rc\n")
        proc = subprocess.run(["bash", "-c", script], env=self.env, cwd=self.cwd,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S)
        if env_file.exists():
            pairs = (e.split("=", 1) for e in env_file.read_text().split("\0") if "=" in e)
            self.env = {k: v for k, v in pairs if k not in SHELL_VARS}
            self.cwd = Path(cwd_file.read_text().strip())
            env_file.unlink()
        return proc.returncode, proc.stdout


def _scratch_dir(path: Path) -> Path:
    """A directory that looks like the repository's root but keeps what examples write."""
    path.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in HIDDEN:
            (path / entry.name).symlink_to(entry)
    return path


@contextlib.contextmanager
def _metro(env: dict[str, str], cwd: Path,
           log: Path) -> Iterator[tuple[dict[str, str], str]]:
    """`cloudlet up` from the venv on free ports with the default state directory of
    this HOME; yields the rewrites from the README's default addresses to its own,
    and what it printed up to its placer line."""
    broker_port, base_port = free_port_run(1), free_port_run(len(NODES))
    with log.open("wb") as err:
        proc = subprocess.Popen(["cloudlet", "up", "--base-port", str(base_port),
                                 "--broker-port", str(broker_port)],
                                env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err,
                                text=True)
    try:
        assert proc.stdout is not None
        started: list[str] = []
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not any(line.startswith("placer") for line in started):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, (
                "cloudlet up did not start:\n" + "".join(started) + log.read_text()[-3000:])
            started.append(line)
        rewrites = {"127.0.0.1:1883": f"127.0.0.1:{broker_port}"}
        rewrites |= {f"127.0.0.1:{8601 + i}": f"127.0.0.1:{base_port + i}"
                     for i in range(len(NODES))}
        yield rewrites, "".join(started)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def terminal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminal]:
    base = tmp_path_factory.mktemp("docs-examples")
    home = base / "home"
    home.mkdir()
    scratch = _scratch_dir(base / "repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDLET_")}
    env |= {"HOME": str(home), "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}
    env.pop("VIRTUAL_ENV", None)
    with _metro(env, scratch, base / "up.log") as (rewrites, up_output):
        # What the README tells a user whose broker is not on the default port.
        env["CLOUDLET_BROKER"] = f"mqtt://{rewrites['127.0.0.1:1883']}"
        yield Terminal(env, scratch, scratch, rewrites, up_output)


def _expects_error(shown: list[str]) -> bool:
    return bool(shown) and shown[0].startswith("cloudlet: error [")


def _run_shell(terminal: Terminal, block: Block) -> None:
    commands = shell_commands(block)
    assert commands, f"{block.id}: no command in the block"
    shape = block.marker == "shape"
    for command, shown in commands:
        shown = [terminal.rewrite(line) for line in shown]
        status, output = terminal.run(terminal.rewrite(command))
        want = 1 if _expects_error(shown) else 0
        assert status == want, f"{block.id}: `{command}` exited {status}:\n{output}"
        if block.lang == "console" and shown:
            assert output_matches(shown, output, shape=shape), (
                f"{block.id}: `{command}` printed\n{output}\nwhere the doc shows\n"
                + "\n".join(shown))


def _run_background(terminal: Terminal, block: Block) -> None:
    ((command, shown),) = shell_commands(block)
    proc = subprocess.Popen(["bash", "-c", terminal.rewrite(command)], env=terminal.env,
                            cwd=terminal.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    output, deadline = "", time.monotonic() + BACKGROUND_WAIT_S
    shown = [terminal.rewrite(line) for line in shown] + ["..."]
    try:
        while not output_matches(shown, output, shape=True):
            assert proc.poll() is None, f"{block.id}: `{command}` ended early:\n{output}"
            assert time.monotonic() < deadline, f"{block.id}: `{command}` printed\n{output}"
            output += proc.stdout.read() or ""
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_python(terminal: Terminal, block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in set(os.environ) - set(terminal.env):
        monkeypatch.delenv(name)
    for name, value in terminal.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(terminal.cwd)
    namespace = terminal.python_namespaces.setdefault(block.path, {"__name__": "__example__"})
    code = compile(terminal.rewrite(block.text), block.id, "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # the docs' own example, run as printed
    if inspect.iscoroutine(result):
        asyncio.run(result)


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_example_runs(block: Block, terminal: Terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    assert block.problem() is None, f"{block.id}: {block.problem()}"
    if block.marker == "skip":
        pytest.skip(f"{block.id}: {block.reason}")
    if block.marker == "background":
        _run_background(terminal, block)
    elif block.lang == "python":
        _run_python(terminal, block, monkeypatch)
    else:
        assert block.lang in SHELL_LANGS | {"console"}
        _run_shell(terminal, block)


def test_cloudlet_up_prints_what_the_readme_shows(terminal: Terminal) -> None:
    """The README's `cloudlet up` block is skipped because the metro is that command:
    what the metro printed is checked against it here instead."""
    (block,) = [b for b in EXAMPLES
                if b.path == "README.md" and b.text.startswith("$ cloudlet up\n")]
    ((command, shown),) = shell_commands(block)
    shown = [terminal.rewrite(line) for line in shown]
    assert command == "cloudlet up"
    assert output_matches(shown, terminal.up_output, shape=True), (
        f"cloudlet up printed\n{terminal.up_output}where {block.id} shows\n" + "\n".join(shown))


def test_some_examples_run() -> None:
    """The collection itself: the README has runnable examples of each kind."""
    run = {b.lang for b in EXAMPLES if b.path == "README.md" and b.marker != "skip"}
    assert run >= {"sh", "console", "python"}
