"""Find the fuzz targets, run each under atheris for a bounded time, replay inputs.

Why a runner and not bare `python fuzz/x.py`: CI needs one command that runs
every target for a fixed time over its committed corpus, fails when any of them
crashes, and keeps the crashing input where a person can turn it into a
regression test. Each target runs in a subprocess of its own, because a crash
ends the process (libFuzzer exits), so does a hang (its `-timeout` alarm) or a
runaway allocation (its `-rss_limit_mb`), and one target's crash must not hide
the others' results.

This module imports only the standard library: the worker process imports the
target (and with it the product's code) inside `atheris.instrument_imports`,
and code imported before that would run without coverage feedback.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"
REGRESSIONS_DIR = FUZZ_DIR / "regressions"
DEFAULT_WORK_DIR = ROOT / ".fuzz"
ENTRY_POINT = "TestOneInput"
# Coverage feedback comes from these packages only: instrumenting numpy, msgpack's
# fallback or aiohttp would slow every run and steer the fuzzer into their code.
INSTRUMENTED = ("cloudlet", "edge_agent", "mobile_client", "fuzz")
# libFuzzer's defaults when a target does not set its own. 4 KiB is libFuzzer's
# own guess for an empty corpus; 10 s is far above any decoder's honest cost
# on a small input, so a run that long is a hang worth a report.
DEFAULT_MAX_INPUT_BYTES = 4096
DEFAULT_TIMEOUT_S = 10
# A decoder must not allocate out of proportion to its input: 1 GiB of RSS for a
# process whose baseline (numpy, wasmtime, compiled workloads) is ~200 MiB.
RSS_LIMIT_MB = 1024
# On top of --seconds: interpreter start, imports, loading the corpus. A worker
# still running after that (plus one input's timeout) is killed and reported.
STARTUP_SLACK_S = 60
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


def fuzz_home() -> Path:
    """A private scratch directory for the harnesses (image stores, dictionaries),
    reused across runs: compiled workloads are cached, so a worker starts in a
    second, and nothing lands in the user's own image store. Per user, 0700: a
    compiled image is trusted code."""
    home = Path(tempfile.gettempdir()) / f"cloudlet-fuzz-{os.getuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    return home


def targets() -> list[str]:
    """Every module of the fuzz package that defines `TestOneInput`, by name.

    Found by reading the source, not importing it: listing targets must not
    pull the product's code into a process that has not been instrumented yet."""
    found = []
    for path in sorted(FUZZ_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == ENTRY_POINT
               for node in tree.body):
            found.append(path.stem)
    return found


def inputs(target: str) -> list[Path]:
    """The committed corpus and the regression inputs of `target`, sorted."""
    paths: list[Path] = []
    for base in (CORPUS_DIR, REGRESSIONS_DIR):
        folder = base / target
        if folder.is_dir():
            paths += sorted(p for p in folder.iterdir() if p.is_file())
    return paths


def entry_point(target: str) -> Callable[[bytes], None]:
    module = importlib.import_module(f"fuzz.{target}")
    function: Callable[[bytes], None] = getattr(module, ENTRY_POINT)
    return function


def check_names(names: Sequence[str]) -> list[str]:
    """`names` (all targets if empty), each checked to be a target."""
    known = targets()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown fuzz target(s) {', '.join(unknown)}; "
                         f"the targets are: {', '.join(known)}")
    return list(names) or known


# --- running under atheris ------------------------------------------------------------


@dataclass
class Outcome:
    """What one target's run came to."""

    target: str
    returncode: int
    elapsed_s: float
    log: Path
    artifacts: list[Path] = field(default_factory=list)
    runs: int | None = None
    hung: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.artifacts and not self.hung


def run(names: Sequence[str], seconds: int, work_dir: Path,
        extra_args: Sequence[str] = (), seed: int | None = None) -> list[Outcome]:
    """Fuzz each target in turn for `seconds`, in a subprocess each; new inputs
    that add coverage go to `work_dir/<target>/corpus`, crashing ones to
    `work_dir/<target>/crashes`. The committed corpus is read, never written."""
    outcomes = []
    for target in names:
        outcome = run_one(target, seconds, work_dir, extra_args, seed)
        outcomes.append(outcome)
        print(describe(outcome), flush=True)
    return outcomes


def run_one(target: str, seconds: int, work_dir: Path, extra_args: Sequence[str] = (),
            seed: int | None = None) -> Outcome:
    grown = work_dir / target / "corpus"
    crashes = work_dir / target / "crashes"
    grown.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / target / "last-run.log"
    before = set(crashes.iterdir())
    # libFuzzer writes new inputs to the first corpus folder only.
    folders = [grown, CORPUS_DIR / target, REGRESSIONS_DIR / target]
    args = [str(f) for f in folders if f.is_dir()]
    args += [f"-max_total_time={seconds}", f"-rss_limit_mb={RSS_LIMIT_MB}",
             f"-artifact_prefix={crashes}{os.sep}", "-print_final_stats=1"]
    if seed is not None:
        args.append(f"-seed={seed}")
    args += extra_args
    command = [sys.executable, "-m", "fuzz", "worker", target, "--", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.monotonic()
    hung = False
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=seconds + STARTUP_SLACK_S + DEFAULT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and only it
            returncode = proc.wait()
    text = log_path.read_text(errors="replace")
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    return Outcome(target, returncode, time.monotonic() - started, log_path,
                   sorted(set(crashes.iterdir()) - before), int(runs[1]) if runs else None, hung)


def describe(outcome: Outcome) -> str:
    """One line for a clean run; for a failed one, why, the input and what to do."""
    runs = f"{outcome.runs:,} runs" if outcome.runs is not None else "runs unknown"
    head = f"{outcome.target:<22} {'ok' if outcome.ok else 'FAILED':<7}" \
           f"{outcome.elapsed_s:6.1f} s  {runs}"
    if outcome.ok:
        return head
    lines = [head]
    if outcome.hung:
        lines.append("  the worker outlived its time budget and was killed")
    text = outcome.log.read_text(errors="replace")
    error = _python_error(text)
    if error:
        lines += ["  " + line for line in error]
    elif outcome.returncode:
        lines.append(f"  exited with code {outcome.returncode}; last lines of {outcome.log}:")
        lines += ["    " + line for line in text.splitlines()[-15:]]
    for artifact in outcome.artifacts:
        lines.append(f"  input saved: {artifact} ({artifact.stat().st_size} bytes)")
        lines.append(f"  reproduce:   python -m fuzz replay {outcome.target} {artifact}")
        lines.append(f"  keep it:     cp {artifact} "
                     f"{REGRESSIONS_DIR.relative_to(ROOT)}/{outcome.target}/<what-it-is>")
    return "\n".join(lines)


def _python_error(log_text: str) -> list[str]:
    """The uncaught exception atheris printed, or libFuzzer's own verdict."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if "Uncaught Python exception" in line:
            block = []
            for follow in lines[i + 1 :]:
                if follow.startswith("==") and "ERROR: libFuzzer" in follow:
                    break
                block.append(follow)
            return block[-25:]
        if "ERROR: libFuzzer:" in line:  # timeout, out of memory
            return lines[i : i + 3]
    return []


def worker(target: str, libfuzzer_args: Sequence[str]) -> NoReturn:
    """The subprocess: instrument the product's code, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        module = importlib.import_module(f"fuzz.{target}")
    args = [sys.argv[0], *libfuzzer_args]
    if not any(a.startswith("-max_len=") for a in args):
        args.append(f"-max_len={getattr(module, 'MAX_INPUT_BYTES', DEFAULT_MAX_INPUT_BYTES)}")
    if not any(a.startswith("-timeout=") for a in args):
        args.append(f"-timeout={getattr(module, 'TIMEOUT_S', DEFAULT_TIMEOUT_S)}")
    tokens: list[bytes] = getattr(module, "DICTIONARY", [])
    if tokens and not any(a.startswith("-dict=") for a in args):
        dictionary = fuzz_home() / f"{target}.dict"
        dictionary.write_text("".join(f'"{_escaped(t)}"\n' for t in tokens))
        args.append(f"-dict={dictionary}")
    mutator = getattr(module, "MUTATOR", None)
    if mutator is not None:
        atheris.Setup(args, getattr(module, ENTRY_POINT), custom_mutator=mutator)
    else:
        atheris.Setup(args, getattr(module, ENTRY_POINT))
    atheris.Fuzz()
    raise SystemExit(0)  # atheris.Fuzz() exits the process itself; this is for the types


def _escaped(token: bytes) -> str:
    """A token in libFuzzer's dictionary syntax: printable ASCII as is, the rest \\xNN."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}"
                   for b in token)


def atheris_missing() -> str | None:
    """Why `run` cannot work here, or None."""
    if importlib.util.find_spec("atheris") is None:
        return ("atheris is not installed: pip install -e '.[dev]' (a cp311 wheel exists "
                "for Linux x86-64); `python -m fuzz replay` works without it")
    return None


# --- replaying and seeding, without atheris ------------------------------------------------


def replay(target: str, paths: Sequence[Path]) -> int:
    """Run `paths` (default: the committed corpus and regressions) through the
    target in this process; print each failure's traceback. Returns the failures."""
    test_one_input = entry_point(target)
    failures = 0
    for path in paths or inputs(target):
        started = time.perf_counter()
        try:
            test_one_input(path.read_bytes())
        except Exception:
            failures += 1
            print(f"FAILED {target} {path}", flush=True)
            traceback.print_exc()
            continue
        print(f"ok     {target} {path} ({(time.perf_counter() - started) * 1000:.1f} ms)")
    return failures


def write_seeds(target: str) -> list[Path]:
    """Regenerate `fuzz/corpus/<target>/` from the target's `seeds()`: the committed
    corpus is exactly what the code says, so it can be rebuilt when a format changes."""
    module = importlib.import_module(f"fuzz.{target}")
    make = getattr(module, "seeds", None)
    if make is None:
        return []
    seeds: dict[str, bytes] = make()
    folder = CORPUS_DIR / target
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.name not in seeds:
            stale.unlink()
    written = []
    for name, data in sorted(seeds.items()):
        path = folder / name
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(path)
    return written
