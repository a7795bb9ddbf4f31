"""docs/deploy.md, step by step, on machines emulated by Linux namespaces.

The page's commands are taken from its fenced blocks, not copied here, so the
page and this test cannot drift. A block the test runs starts with a line
saying where it runs (`# on the operator's machine`, `# on the broker's
machine`, `# on each cloudlet's machine`, `# on a client`; "..., for each
cloudlet" runs it once per cloudlet). The page's documented variables
(`BROKER_HOST`, `NODE`, `NODE_HOST`, `CLOUDLET_SRC`, `ALICE_BROKER_PASSWORD`)
are set in the environment, as the page tells its reader to; nothing else of
a block is changed, except what no namespace can do:

- installing from PyPI and apt (`pip install`, `apt-get`): each cloudlet's
  `/opt/cloudlet` is the virtualenv under test, and Mosquitto must be installed;
- systemd is not running: `systemctl enable --now UNIT` runs the unit file the
  page copied to that machine as systemd would (its `User=`, `Group=`,
  `StateDirectory=`, `LimitNOFILE=`, `UMask=`, `ExecStart=`), after
  `systemd-analyze verify` (when installed) accepts it there;
- `ssh root@HOST 'CMD'` is a stand-in that runs CMD on the machine at HOST.

A machine is a network namespace with its own address on a private LAN (a
bridge in a namespace of its own) and a mount namespace whose `/etc`,
`/var/lib`, `/opt` and `/usr/local` are copy-on-write overlays, so `useradd`,
`/etc/cloudlet` and `/var/lib/cloudlet` are each machine's own. The operator
and the client are this test's own process, on the LAN through a veth.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
VENV = Path(sys.executable).parent.parent
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OVERLAID = ("/etc", "/var/lib", "/opt", "/usr/local")  # each machine's own
NODES = ("downtown", "harbor")  # the page's example cluster
HOST_SUFFIX = {"operator": 1, "broker": 10, "downtown": 11, "harbor": 12}
START_TIMEOUT_S = 30.0
# A first start compiles the placer before the orchestrator contests its lease.
LEAD_TIMEOUT_S = 90.0
ROLE = re.compile(r"^# on (the operator's machine|the broker's machine|each cloudlet's machine"
                  r"|a client)(, for each cloudlet)?$")


# --- the page ----------------------------------------------------------------------------


@dataclass
class Block:
    line: int
    lang: str
    role: str  # operator, broker, cloudlet, client
    per_node: bool
    lines: list[str]  # sh: the script; console: the `$` commands
    shown: list[list[str]] = field(default_factory=list)  # console: each command's output

    @property
    def machine_roles(self) -> list[str]:
        return list(NODES) if self.role == "cloudlet" else [self.role]


def deploy_blocks(text: str) -> list[Block]:
    """The page's blocks that say where they run, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i, fence.group(1)
        i += 1
        body: list[str] = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        role = ROLE.match(body[0]) if body and lang in ("sh", "console") else None
        if role is None:
            continue
        kind = {"the operator's machine": "operator", "the broker's machine": "broker",
                "each cloudlet's machine": "cloudlet", "a client": "client"}[role.group(1)]
        rest, shown = body[1:], []
        if lang == "console":
            for ln in rest:
                if ln.startswith("$ "):
                    shown.append([])
                else:
                    shown[-1].append(ln)
            rest = [ln[2:] for ln in rest if ln.startswith("$ ")]
        blocks.append(Block(start + 1, lang, kind, bool(role.group(2)), rest, shown))
    return blocks


def test_the_page_says_where_each_of_its_commands_runs() -> None:
    """Every shell block of the page is one this test runs, and the generic
    docs-example runner is told to leave each alone (it needs several machines)."""
    text = DOC.read_text()
    lines = text.splitlines()
    runnable = {b.line for b in deploy_blocks(text)}
    shell = [n + 1 for n, ln in enumerate(lines) if re.match(r"^```(sh|console|python)\s*$", ln)]
    assert shell and set(shell) == runnable
    for n in shell:
        assert lines[n - 2].startswith("<!-- example: skip — "), f"deploy.md:L{n}"


# --- the unit files ------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def test_the_units_are_hardened_and_start_real_commands() -> None:
    """What docs/deploy.md says of the units, and that their ExecStart lines
    name a real command with flags it takes."""
    agent = read_unit(ROOT / "configs/systemd/cloudlet-agent.service")["Service"]
    broker = read_unit(ROOT / "configs/systemd/cloudlet-broker.service")["Service"]
    for service, user in ((agent, "cloudlet"), (broker, "mosquitto")):
        assert service["User"] == user
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
        assert service["Restart"] == "on-failure" and int(service["LimitNOFILE"]) >= 4096
        assert service["CapabilityBoundingSet"] == ""
    assert agent["StateDirectory"] == "cloudlet"
    assert agent["ReadWritePaths"] == "/var/lib/cloudlet"
    assert "MemoryDenyWriteExecute" not in agent  # wasmtime writes machine code
    argv = shlex.split(agent["ExecStart"])
    assert argv[:2] == ["/usr/local/bin/cloudlet", "agent"]
    from cloudlet.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.command == "agent" and args.config == "/etc/cloudlet/node.toml"
    assert shlex.split(broker["ExecStart"])[1:] == ["-c", "/etc/cloudlet/broker/mosquitto.conf"]


# --- the machines --------------------------------------------------------------------------


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Machine:
    role: str
    address: str
    netns: str
    holder: subprocess.Popen[bytes]
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        """The machine's file system as its processes see it."""
        return Path(f"/proc/{self.holder.pid}/root")

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--"]

    def sh(self, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.enter(), "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                               "sh", "-e", "-c", script], capture_output=True, text=True,
                              timeout=120)


def _free_subnet() -> str:
    routes = _run("ip", "-4", "route", "show", "table", "all").stdout
    for third in range(200, 250):
        prefix = f"10.231.{third}"
        if f"{prefix}." not in routes:
            return prefix
    pytest.skip("no free 10.231.x.0/24 subnet for the emulated LAN")


def _need_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("emulating machines needs root (network and mount namespaces)")
    for tool in ("ip", "nsenter", "unshare", "setpriv", "mosquitto"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed (needed to emulate the page's machines)")
    probe = f"cldep-probe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        pytest.skip("`ip netns add` is not permitted here")
    _run("ip", "netns", "del", probe)


def _closed_ancestors(path: Path) -> list[Path]:
    """The directories above `path`, outermost first, that other users cannot enter."""
    return [d for d in reversed(path.resolve().parents)
            if not d.stat().st_mode & stat.S_IXOTH]


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[dict[str, Machine]]:
    """The broker and the cloudlets' machines on a LAN with this process."""
    _need_namespaces()
    prefix = _free_subnet()
    tag = str(os.getpid() % 100000)
    switch = f"cldep-lan{tag}"
    uplink = f"cldep{tag}"
    machines: dict[str, Machine] = {}
    namespaces = [switch]
    try:
        _run("ip", "netns", "add", switch)
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        _run("ip", "link", "add", uplink, "type", "veth", "peer", "name", "up0",
             "netns", switch)
        _run("ip", "-n", switch, "link", "set", "up0", "master", "br0", "up")
        _run("ip", "addr", "add", f"{prefix}.{HOST_SUFFIX['operator']}/24", "dev", uplink)
        _run("ip", "link", "set", uplink, "up")
        for role in ("broker", *NODES):
            netns = f"cldep-{role[:4]}{tag}"
            namespaces.append(netns)
            _run("ip", "netns", "add", netns)
            _run("ip", "-n", switch, "link", "add", f"p-{role[:4]}", "type", "veth", "peer",
                 "name", "eth0", "netns", netns)
            _run("ip", "-n", switch, "link", "set", f"p-{role[:4]}", "master", "br0", "up")
            address = f"{prefix}.{HOST_SUFFIX[role]}"
            _run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _run("ip", "-n", netns, "link", "set", "eth0", "up")
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            mounts = []
            for i, path in enumerate(OVERLAID):
                upper, work = tmp_path / role / f"up{i}", tmp_path / role / f"work{i}"
                upper.mkdir(parents=True)
                work.mkdir()
                mounts.append(f"mount -t overlay overlay -o lowerdir={path},upperdir={upper},"
                              f"workdir={work} {path}")
            if role != "broker":  # the install's stand-in: the virtualenv under test
                # ... which the unit's User= must reach: a checkout inside a 0700
                # directory (CI's mktemp) is opened to it on this machine only, by an
                # overlay whose root alone gets o+x.
                for i, closed in enumerate(_closed_ancestors(VENV)):
                    upper, work = tmp_path / role / f"open{i}", tmp_path / role / f"owork{i}"
                    upper.mkdir(parents=True)
                    work.mkdir()
                    mounts.append(f"mount -t overlay overlay -o lowerdir={closed},"
                                  f"upperdir={upper},workdir={work} {closed}")
                    mounts.append(f"chmod o+x {closed}")
                mounts.append(f"ln -s {VENV} /opt/cloudlet")
            holder = subprocess.Popen(
                ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-e", "-c", " && ".join([*mounts, "echo up", "exec sleep 1000000"])],
                stdout=subprocess.PIPE)
            assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
            machines[role] = Machine(role, address, netns, holder)
        yield machines
    finally:
        # The cloudlets stop first (a clean stop says offline through the broker).
        for group in ([m for r, m in machines.items() if r != "broker"],
                      [m for r, m in machines.items() if r == "broker"]):
            stopping = [p for m in group for p in m.services if p.poll() is None]
            for proc in stopping:
                proc.send_signal(signal.SIGTERM)
            for proc in stopping:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for machine in machines.values():
            machine.holder.kill()
            machine.holder.wait()
        subprocess.run(["ip", "link", "del", uplink], capture_output=True)
        for netns in namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


FAKE_SSH = """#!/bin/sh
# ssh's stand-in: `ssh [OPTIONS] USER@HOST CMD...` runs CMD on the emulated machine HOST.
while [ "${1#-}" != "$1" ]; do shift; done
host=${1#*@}; shift
pid=$(cat "$EMULATED_MACHINES/$host") || exit 255
exec nsenter -t "$pid" -m -n -- env -i PATH=@PATH@ HOME=/root sh -c "$*"
""".replace("@PATH@", SYSTEM_PATH)


# --- following the page ------------------------------------------------------------------


class Deployment:
    def __init__(self, machines: dict[str, Machine], workdir: Path) -> None:
        self.machines = machines
        self.workdir = workdir  # the operator's directory (and the client's)
        bin_dir = workdir.parent / "bin"
        hosts = workdir.parent / "machines"
        bin_dir.mkdir()
        hosts.mkdir()
        (bin_dir / "ssh").write_text(FAKE_SSH)
        (bin_dir / "ssh").chmod(0o755)
        for machine in machines.values():
            (hosts / machine.address).write_text(str(machine.holder.pid))
        self.vars = {"BROKER_HOST": machines["broker"].address, "CLOUDLET_SRC": str(ROOT)}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDLET_", "SSL_"))}
        self.local_env = {**env, "PATH": f"{bin_dir}:{VENV / 'bin'}:{env.get('PATH', '')}",
                          "CLOUDLET_HOME": str(workdir.parent / "home"),
                          "EMULATED_MACHINES": str(hosts)}
        self.outputs: list[tuple[Block, str, str]] = []  # (block, node, output)
        self.shell_state = workdir.parent / "shell-state"
        self.shell_state.write_text("")

    def follow(self, block: Block) -> None:
        for_nodes = NODES if block.per_node or block.role == "cloudlet" else ("",)
        for node in for_nodes:
            values = dict(self.vars)
            if node:
                values |= {"NODE": node, "NODE_HOST": self.machines[node].address}
            script, units = self.script(block)
            if block.role in ("operator", "client"):
                # One terminal on this machine, as the page reads: what a block
                # exports stays for the next one (the page's variables are this run's).
                given = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
                script = f". {self.shell_state}\n{given}{script}export -p > {self.shell_state}\n"
                done = subprocess.run(["sh", "-e", "-c", script], cwd=self.workdir,
                                      env={**self.local_env, **values}, capture_output=True,
                                      text=True, timeout=120)
            else:
                machine = self.machines[node or block.role]
                done = machine.sh(script, {"PATH": SYSTEM_PATH, "HOME": "/root", **values})
            output = done.stdout + done.stderr
            with (self.workdir.parent / "outputs.txt").open("a") as record:  # for a failure
                record.write(f"--- deploy.md:L{block.line} {node}\n{output}")
            assert done.returncode == 0, f"deploy.md:L{block.line} ({node}) failed:\n{output}"
            self.outputs.append((block, node, output))
            password = re.search(r"^client alice: broker password (\S+)", output, re.M)
            if password:
                self.vars["ALICE_BROKER_PASSWORD"] = password.group(1)
            for unit in units:
                self.start(self.machines[node or block.role], unit)

    def script(self, block: Block) -> tuple[str, list[str]]:
        """The block as a script, less what the namespaces cannot do (the module's
        docstring); and the units it enables."""
        lines, units = [], []
        for line in block.lines:
            words = line.split()
            if line.startswith("apt-get ") or "pip install" in line:
                continue
            if words[:1] == ["systemctl"]:
                for part in line.split("&&"):
                    cmd = part.split()
                    if cmd[1:3] == ["enable", "--now"]:
                        units.append(cmd[3])
                continue
            if block.lang == "console":  # each command's output, told apart
                lines.append(f"echo {shlex.quote('@@ ' + line)}")
                line = f"{line} 2>&1"
            lines.append(line)
        return "\n".join(lines) + "\n", units

    def start(self, machine: Machine, unit_name: str) -> None:
        """Start a unit as systemd would: the file the page put on the machine."""
        path = machine.root / "etc/systemd/system" / f"{unit_name}.service"
        service = read_unit(path)["Service"]
        if shutil.which("systemd-analyze"):
            verify = subprocess.run([*machine.enter(), "systemd-analyze", "verify",
                                     f"/etc/systemd/system/{unit_name}.service"],
                                    capture_output=True, text=True, timeout=60)
            assert verify.returncode == 0, verify.stderr
        user, group = service["User"], service.get("Group", service["User"])
        # LimitNOFILE, as far as this container's hard limit lets root raise it.
        nofile = service.get("LimitNOFILE", "1024")
        setup = [f"{{ ulimit -n {nofile} 2>/dev/null || ulimit -n $(ulimit -H -n); }}",
                 f"umask {service.get('UMask', '0022')}"]
        if "StateDirectory" in service:
            setup.append(f"install -d -o {user} -g {group} "
                         f"-m {service.get('StateDirectoryMode', '0755')} "
                         f"/var/lib/{service['StateDirectory']}")
        home = {"cloudlet": "/var/lib/cloudlet", "mosquitto": "/var/lib/mosquitto"}[user]
        log = (self.workdir.parent / f"{machine.role}-{unit_name}.log").open("wb")
        proc = subprocess.Popen(
            [*machine.enter(), "env", "-i", f"PATH={SYSTEM_PATH}", f"HOME={home}",
             f"USER={user}", f"LOGNAME={user}", "sh", "-e", "-c",
             " && ".join([*setup, f"exec setpriv --reuid {user} --regid {group} --init-groups "
                                  f"--no-new-privs -- {service['ExecStart']}"])],
            stdout=log, stderr=subprocess.STDOUT)
        machine.services.append(proc)

    def log(self, role: str, unit: str) -> str:
        path = self.workdir.parent / f"{role}-{unit}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(what: str, check: object, timeout_s: float = START_TIMEOUT_S,
              logs: object = None) -> None:
    """Poll `check` until it holds; on a timeout, say what and show `logs()`."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            shown = logs() if logs is not None else ""  # type: ignore[operator]
            raise AssertionError(f"timed out waiting for {what}\n{shown}")
        time.sleep(0.1)


def _listening(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_deploy_md_on_emulated_machines(lan: dict[str, Machine], tmp_path: Path) -> None:
    workdir = tmp_path / "admin"
    workdir.mkdir(mode=0o700)
    d = Deployment(lan, workdir)
    blocks = deploy_blocks(DOC.read_text())
    checks = [b for b in blocks if b.lang == "console"]
    for block in blocks:
        if block.lang == "console":
            continue
        d.follow(block)
    broker, nodes = lan["broker"], [lan[n] for n in NODES]
    _wait_for("the broker's TLS listener", lambda: _listening(broker.address, 8883))
    for node in nodes:
        _wait_for(f"cloudlet {node.role} on the broker",
                  lambda node=node: "control plane connected" in d.log(node.role,
                                                                        "cloudlet-agent"),
                  logs=lambda node=node: (d.log(node.role, "cloudlet-agent")[-3000:]
                                          + d.log("broker", "cloudlet-broker")[-2000:]))

    # What the page promises of the files it put on each machine.
    assert not [p for p in workdir.glob("deploy/**/*") if p.name.endswith("ca.key")]
    for key in ("ca.key", "tls-ca.key"):
        assert stat.S_IMODE((workdir / "cluster" / key).stat().st_mode) == 0o600
    for machine, group in [*((n, "cloudlet") for n in nodes), (broker, "mosquitto")]:
        etc = machine.root / ("etc/cloudlet" if group == "cloudlet" else "etc/cloudlet/broker")
        gid = _id_of(machine, "group", group)
        assert stat.S_IMODE(etc.stat().st_mode) == 0o750 and etc.stat().st_gid == gid
        for f in etc.iterdir():
            st = f.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid), f
        assert not {"ca.key", "tls-ca.key"} & {f.name for f in etc.iterdir()}
    assert not (broker.root / "etc/cloudlet/broker/cluster.key").exists()
    for machine, user in [*((n, "cloudlet") for n in nodes), (broker, "mosquitto")]:
        (service,) = machine.services  # runs as the unit's User=, not as root
        assert _uid_of_process(service.pid) == _id_of(machine, "passwd", user)

    for block in checks:
        d.follow(block)
    ran = _by_command(d)
    shown = [lines for block in checks for lines in block.shown]
    assert len(ran) == len(shown)
    for (cmd, text), expected in zip(ran, shown, strict=True):
        if expected:  # the page shows what it prints: the same, but for numbers and ids
            assert _shape(text.splitlines()) == _shape(expected), (cmd, text)

    def out(command: str) -> str:
        return next(text for cmd, text in ran if cmd.startswith(command))

    status = out("cloudlet status")
    for node in nodes:
        assert re.search(rf"^{node.role}\s+online\s+https://{re.escape(node.address)}:8600\s",
                         status, re.M), status
    offload = out("cloudlet offload").splitlines()
    assert offload[0] == "1", offload
    assert re.match(r"latency [\d.]+ ms on (downtown|harbor) ", offload[1]), offload
    assert re.match(r"moved VM \w+ to harbor \(live\)", out("cloudlet migrate"))
    calls = [text.strip() for cmd, text in ran if cmd.startswith("cloudlet vm call")]
    assert calls == ["1", "42"]  # the VM's state crossed machines with it
    assert re.match(r"destroyed \w+ on harbor", out("cloudlet vm destroy"))
    # An orchestrator contests the lease once its placer's compiled loops are loaded:
    # on a first start they compile (seconds; later starts load them from the state
    # directory's cache).
    _wait_for("a cloudlet's orchestrator to lead",
              lambda: any("leading region default" in d.log(n.role, "cloudlet-agent")
                          for n in nodes), timeout_s=LEAD_TIMEOUT_S,
              logs=lambda: "\n".join(d.log(n.role, "cloudlet-agent")[-2000:] for n in nodes))

    for node in nodes:  # SIGTERM, as systemctl stop sends it: a clean stop
        (agent,) = node.services
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, d.log(node.role, "cloudlet-agent")


def _id_of(machine: Machine, database: str, name: str) -> int:
    """A user's or group's id on the emulated machine (its own /etc/passwd, /etc/group)."""
    for line in (machine.root / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no {name} in {machine.role}'s /etc/{database}")


def _uid_of_process(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no process {pid}")


def _shape(lines: list[str]) -> list[str]:
    """Output with its numbers, addresses, VM ids and cloudlet names blanked (an
    offload goes to the nearest, either one here), and spacing collapsed."""
    lines = [re.sub(r"\b[0-9a-f]{16}\b", "ID", line) for line in lines]
    lines = [re.sub(rf"\b({'|'.join(NODES)})\b", "NODE", line) for line in lines]
    return [" ".join(re.sub(r"\d+(\.\d+)*", "N", line).split()) for line in lines]


def _by_command(d: Deployment) -> list[tuple[str, str]]:
    """Each `$` command of the console blocks run, with its output."""
    found = []
    for block, _, output in d.outputs:
        if block.lang != "console":
            continue
        parts = re.split(r"^@@ (.*)$", output, flags=re.M)
        found += [(parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]
    return found
