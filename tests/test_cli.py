"""The exact command-line forms other checks rely on, and their error behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from cloudlet import cli, cli_registry
from cloudlet.errors import MissingDependency
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


def test_every_subcommand_is_declared_with_its_extra() -> None:
    """The entry points `cloudlet` finds its commands through name every command
    their functions register, so each has its install hint when its extra is
    missing (an undeclared command would give a traceback instead)."""
    declared = cli_registry.declared()
    targets: dict[str, set[str]] = {}
    for ep in declared:
        targets.setdefault(f"{ep.module}:{ep.attr}", set()).add(ep.name)
    for target, names in targets.items():
        parser = cli_registry.CommandParser()
        sub = parser.add_subparsers()
        group_names = {name.partition(" ")[0] for name in names if " " in name}
        function = next(ep for ep in declared if f"{ep.module}:{ep.attr}" == target).load()
        if group_names:  # commands added to another package's group ("vm ls")
            (group,) = group_names
            group_sub = sub.add_parser(group).add_subparsers()
            function(group_sub)
            assert {f"{group} {name}" for name in group_sub.choices} == names, target
        else:
            function(sub)
            assert set(sub.choices) == names, target
    extras = {ep.name: ep.extras for ep in declared}
    assert extras["vm"] == ["local"] and extras["sim"] == ["sim"] and extras["up"] == ["edge"]
    assert extras["offload"] == [] and extras["vm ls"] == []


def test_help_lists_every_declared_command() -> None:
    listed = cli.build_parser().format_help()
    for ep in cli_registry.declared():
        if " " not in ep.name:
            assert f"    {ep.name} " in listed or f"    {ep.name}\n" in listed, ep.name
    # The SDK's commands in the VM runtime's group, registered after every group.
    assert cli.build_parser().parse_args(["vm", "ls"]).vm_command == "ls"


def test_the_extra_of_a_missing_package_comes_from_the_metadata() -> None:
    assert cli_registry.extra_bringing("numpy") == "local"
    assert cli_registry.extra_bringing("matplotlib.pyplot") == "sim"
    assert cli_registry.extra_bringing("prometheus_client") == "edge"
    assert cli_registry.extra_bringing("amqtt") == "edge"
    assert cli_registry.extra_bringing("aiohttp") is None  # the base install has it
    assert cli_registry.extra_bringing("no_such_package") is None


def test_a_command_whose_module_cannot_import_is_a_stand_in_with_the_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A package whose command module imports a package its extra brings: the
    command stays listed, says what to install, and running it says the same."""
    (tmp_path / "needs_extra.py").write_text("import no_such_package_here\n")
    (tmp_path / "fine.py").write_text(
        "def register(sub):\n"
        "    sub.add_parser('fine', help='works').set_defaults(handler=lambda args: 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = cli_registry.GROUP
    parser = cli_registry.CommandParser(prog="cloudlet")
    sub = parser.add_subparsers(dest="command")
    cli_registry.add_commands(sub, [
        metadata.EntryPoint("heavy", "needs_extra:register [edge]", group),
        metadata.EntryPoint("heavier", "needs_extra:register [edge]", group),
        metadata.EntryPoint("fine", "fine:register", group),
        metadata.EntryPoint("gone", "no_such_package_at_all.cli:register", group),
    ])
    assert set(sub.choices) == {"heavy", "heavier", "fine"}  # "gone" is not installed
    listed = parser.format_help()
    assert listed.count("(needs: pip install 'cloudlet[edge]')") == 2
    args = parser.parse_args(["heavy", "x", "--y"])
    with pytest.raises(MissingDependency, match=r"no_such_package_here: pip install "
                                                r"'cloudlet\[edge\]'"):
        args.handler(args)
    assert parser.parse_args(["fine"]).handler(None) == 0
