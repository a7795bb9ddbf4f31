"""The exact command-line forms other checks rely on, and their error behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WORKLOADS

KV = str(WORKLOADS / "kvstore.wasm")
HOG = str(WORKLOADS / "memhog.wasm")


def cloudlet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_run_snapshot_resume_inspect(cli_env: dict[str, str], tmp_path: Path) -> None:
    snap1, snap2 = tmp_path / "a.snap", tmp_path / "b.snap"
    out = cloudlet(cli_env, "vm", "run", KV, "--call", "kv_put 1 10", "--call", "kv_put 2 -20",
                   "--call", "kv_set s:name=cloudlet", "--call", "noop",
                   "--snapshot-out", str(snap1))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["1", "1", "x:", ""]
    out = cloudlet(cli_env, "vm", "run", "--from-snapshot", str(snap1), "--call", "kv_get 2",
                   "--call", "kv_lookup s:name", "--call", "kv_count",
                   "--snapshot-out", str(snap2))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["-20", "x:" + b"cloudlet".hex(), "2"]

    info = json.loads(cloudlet(cli_env, "vm", "inspect", "--json", str(snap2)).stdout)
    assert info["seq"] == 7 and info["format_version"] == 1
    assert info["memory_bytes"] == 2 * 65536
    assert 0 < info["overlay_bytes"] <= info["memory_bytes"]
    assert len(info["image_digest"]) == 64
    text = cloudlet(cli_env, "vm", "inspect", str(snap2)).stdout
    for word in ("image", info["image_digest"], "memory size", "overlay size",
                 "sequence number", "format version"):
        assert word in text


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["vm", "run", KV, "--call", "nope"], "bad_call"),
        (["vm", "run", KV, "--call", "kv_put 1"], "bad_call"),
        (["vm", "run", KV, "--call", "kv_put 1 x"], "bad_call"),
        (["vm", "run", KV, "--call", "kv_put 1 99999999999"], "bad_call"),
        (["vm", "run", KV, "--call", 'kv_put "1'], "bad_call"),
        (["vm", "run", "/nonexistent.wasm"], "image_not_found"),
        (["vm", "run", __file__], "image_rejected"),
        (["vm", "run", HOG, "--call", "hog_spin", "--deadline-ms", "50"], "vm_deadline_exceeded"),
        (["vm", "run", HOG, "--call", "hog_spin", "--fuel", "100000"], "vm_out_of_fuel"),
        (["vm", "run", HOG, "--call", "hog_trap 1"], "vm_trapped"),
        (["vm", "run", HOG, "--memory-mib", "0"], "bad_call"),
        (["vm", "run", "--from-snapshot", "/nonexistent.snap"], "snapshot_corrupt"),
        (["vm", "run", "--from-snapshot", __file__], "snapshot_corrupt"),
        (["vm", "inspect", __file__], "snapshot_corrupt"),
        (["vm", "run"], "bad_call"),
    ],
)
def test_errors_are_one_line_without_traceback(cli_env: dict[str, str], args: list[str],
                                               code: str) -> None:
    out = cloudlet(cli_env, *args)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"cloudlet: error [{code}]:"), lines[0]
    assert "Traceback" not in out.stderr


def test_wrong_image_for_snapshot(cli_env: dict[str, str], tmp_path: Path) -> None:
    snap = tmp_path / "kv.snap"
    assert cloudlet(cli_env, "vm", "run", KV, "--snapshot-out", str(snap)).returncode == 0
    out = cloudlet(cli_env, "vm", "run", HOG, "--from-snapshot", str(snap))
    assert out.returncode == 1 and "snapshot_image_mismatch" in out.stderr


def test_results_printed_before_a_failing_call(cli_env: dict[str, str]) -> None:
    out = cloudlet(cli_env, "vm", "run", HOG, "--call", "add 2 3", "--call", "hog_trap 1")
    assert out.stdout.splitlines() == ["5"] and out.returncode == 1


def test_usage_errors_exit_2(cli_env: dict[str, str]) -> None:
    out = cloudlet(cli_env, "vm", "frobnicate")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_every_subcommand_is_listed_with_its_extra() -> None:
    """The list `cloudlet` uses to say which extra a missing command needs names
    every command its packages register (a stale list gives no install hint)."""
    import argparse
    import importlib

    from cloudlet.cli import COMMANDS

    for module, names, _ in COMMANDS:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        assert set(sub.choices) == set(names), module
