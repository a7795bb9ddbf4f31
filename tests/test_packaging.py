"""The base install is the client SDK: without the extras, the SDK works and the
command line says which extra a command needs, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cloudlet.trust.client_tokens import ClientTokens
from cloudlet.trust.keys import SigningKey
from tests.conftest import ROOT

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

# Runs `cloudlet ARGS` in a Python where the extras' packages cannot be imported.
WITHOUT_EXTRAS = """
import sys, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"numpy", "wasmtime", "xxhash", "zstandard", "amqtt",
                                  "matplotlib", "tqdm", "uvloop", "prometheus_client"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
import mobile_client, mobile_client.sync  # the SDK imports fine
from cloudlet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_bare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_commands_name_the_missing_extra() -> None:
    for args, extra in ((["vm", "run", "x.wasm"], "local"), (["up"], "edge"),
                        (["sim", "configs/sim/small-metro.toml"], "sim")):
        out = run_bare(*args)
        assert out.returncode == 1, out.stderr
        assert "error [missing_dependency]" in out.stderr, out.stderr
        assert f"cloudlet[{extra}]" in out.stderr and "Traceback" not in out.stderr


def test_sdk_commands_work_without_extras() -> None:
    token = ClientTokens(b"s" * 32, SigningKey.generate().public_bytes).issue("t", 60)
    out = run_bare("offload", "--endpoint", "http://127.0.0.1:9", "--token", token,
                   str(ROOT / "workloads" / "kvstore.wasm"), "kv_count")
    assert out.returncode == 1 and "error [no_cloudlet_available]" in out.stderr, out.stderr
    out = run_bare("offload", "--endpoint", "http://127.0.0.1:9", "--token", "t",
                   str(ROOT / "workloads" / "kvstore.wasm"), "kv_count")
    assert out.returncode == 1 and "error [unauthorized]: malformed token" in out.stderr
