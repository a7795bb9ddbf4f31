"""`cloudlet node-files`, `cloudlet tls-cert` and `broker-config` for another machine:
what they write, that it is what a cloudlet and Mosquitto accept, and that the
authority's keys never leave the operator's directory. (The whole deployment,
run for real on emulated machines: tests/test_deploy.py.)"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from cloudlet.cli import main
from cloudlet.errors import ConfigError
from cloudlet.trust.certs import ROLE_CLOUDLET, ROLE_ORCHESTRATOR, CertificateVerifier
from cloudlet.trust.cluster import load_identity
from cloudlet.trust.keys import read_public_key
from cloudlet.trust.tls import issue_server_cert
from edge_agent.broker_files import write_mosquitto_files
from edge_agent.config import load_node_config
from edge_agent.identity import load_node_trust


def test_node_files_are_what_the_cloudlet_needs_and_no_more(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    state, out = tmp_path / "cluster", tmp_path / "deploy" / "harbor"
    assert main(["node-files", "--node", "harbor", "--state-dir", str(state), "--out", str(out),
                 "--tls-host", "10.0.0.12", "--tls-host", "harbor.example"]) == 0
    assert "harbor" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.pub", "cluster.key", "node.cert", "node.key", "node.toml", "tls-ca.pem", "tls.key",
        "tls.pem"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    assert (state / "ca.key").exists() and (state / "tls-ca.key").exists()
    assert (out / "cluster.key").read_bytes() == (state / "cluster.key").read_bytes()

    # The cloudlet starts from it with its identity, without the authority's key at hand.
    config = load_node_config(out / "node.toml")
    assert config.name == "harbor" and config.broker_username == "node.harbor"
    assert config.tls_cert_file == str(out / "tls.pem") and config.broker_ca_file
    trust = load_node_trust(config)
    assert trust.identity.subject == "harbor"
    assert trust.identity.cert.has_role(ROLE_CLOUDLET)
    assert trust.identity.cert.has_role(ROLE_ORCHESTRATOR)

    # Its HTTPS certificate is for the names given, and chains to tls-ca.pem.
    cert = x509.load_pem_x509_certificate((out / "tls.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.12"]
    assert names.get_values_for_type(x509.DNSName) == ["harbor.example"]
    context = ssl.create_default_context(cafile=str(out / "tls-ca.pem"))
    context.load_cert_chain(out / "tls.pem", out / "tls.key")  # key and certificate match
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((state / "tls-ca.pem").read_bytes()))


def test_running_node_files_again_renews_the_certificate_and_keeps_the_key(
        tmp_path: Path) -> None:
    state, out = tmp_path / "cluster", tmp_path / "out"
    assert main(["node-files", "--node", "downtown", "--state-dir", str(state),
                 "--out", str(out)]) == 0
    key, cert = (out / "node.key").read_bytes(), (out / "node.cert").read_bytes()
    assert main(["node-files", "--node", "downtown", "--state-dir", str(state),
                 "--out", str(out), "--ttl-days", "30"]) == 0
    assert (out / "node.key").read_bytes() == key and (out / "node.cert").read_bytes() != cert
    verifier = CertificateVerifier(read_public_key(state / "ca.pub"))
    identity = load_identity(out / "node.key", out / "node.cert", verifier)
    assert 29 * 86400 < identity.cert.not_after - identity.cert.not_before <= 30 * 86400
    assert not (out / "tls.pem").exists()  # no --tls-host, no HTTPS certificate


@pytest.mark.parametrize("argv, message", [
    (["--node", "no/slash"], "name"),
    (["--node", "ok", "--tls-host", "not a host"], "neither an IP address"),
    (["--node", "ok", "--ttl-days", "0"], "--ttl-days"),
])
def test_node_files_refuses_bad_input_before_writing(tmp_path: Path, argv: list[str],
                                                     message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["node-files", "--state-dir", str(tmp_path / "c"), "--out", str(out),
                 *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (out / "node.toml").exists()


def test_node_files_will_not_write_into_the_clusters_own_directory(tmp_path: Path) -> None:
    from edge_agent.node_files import write_node_files

    with pytest.raises(ConfigError, match=r"ca\.key"):
        write_node_files(tmp_path, "x", tmp_path, tls_hosts=[], ttl_days=1)


def test_tls_cert_for_the_broker_shares_the_clusters_tls_authority(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    assert main(["tls-cert", "--host", "10.0.0.10", "--state-dir", str(state),
                 "--out", str(tmp_path / "broker")]) == 0
    _, _, node_ca = issue_server_cert(state, ["10.0.0.11"], tmp_path / "node")
    assert (tmp_path / "broker" / "tls-ca.pem").read_bytes() == node_ca.read_bytes()


def test_broker_config_names_its_files_where_they_will_be_and_turns_tls_on(
        tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    assert main(["node-files", "--node", "downtown", "--state-dir", str(state),
                 "--out", str(tmp_path / "n")]) == 0
    out = tmp_path / "deploy" / "broker"
    write_mosquitto_files(state, out, nodes=["downtown"], clients=["alice"],
                          listener="0.0.0.0:8883", installed_in=Path("/etc/cloudlet/broker"),
                          tls_cert="/etc/cloudlet/broker/tls.pem",
                          tls_key="/etc/cloudlet/broker/tls.key")
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert conf[1:4] == ["listener 8883 0.0.0.0", "certfile /etc/cloudlet/broker/tls.pem",
                         "keyfile /etc/cloudlet/broker/tls.key"]
    assert "password_file /etc/cloudlet/broker/passwd" in conf
    assert "acl_file /etc/cloudlet/broker/acl" in conf
    with pytest.raises(ConfigError, match="together"):
        write_mosquitto_files(state, out, nodes=["downtown"], clients=[], listener="h:1",
                              tls_cert="/x.pem")


@pytest.mark.parametrize("changed", [
    {"installed_in": Path("/etc/x\nallow_anonymous true\nlistener 1884 0.0.0.0\n#")},
    {"installed_in": Path("etc/cloudlet")},  # relative: read where on the broker?
    {"tls_cert": "/c.pem\nallow_anonymous true", "tls_key": "/k.pem"},
    {"tls_cert": "/c.pem", "tls_key": " /k.pem"},
    {"listener": "0.0.0.0\nallow_anonymous true\nlistener 1 x:8883"},
    {"listener": "0.0.0.0 1884:8883"},
    {"nodes": ["z\ntopic readwrite #"]},
    {"nodes": ["a+"]},
    {"nodes": ["a#"]},
    {"nodes": ["a/b"]},
])
def test_broker_config_refuses_what_would_add_lines_or_wildcards(
        tmp_path: Path, changed: dict[str, object]) -> None:
    """Every option becomes part of a line of mosquitto.conf, acl or passwd: a line
    break or an MQTT wildcard in one would grant what the cluster never granted."""
    state = tmp_path / "cluster"
    assert main(["node-files", "--node", "downtown", "--state-dir", str(state),
                 "--out", str(tmp_path / "n")]) == 0
    args: dict[str, object] = {"nodes": ["downtown"], "clients": [],
                               "listener": "0.0.0.0:8883", **changed}
    out = tmp_path / "broker"
    with pytest.raises(ConfigError):
        write_mosquitto_files(state, out, **args)  # type: ignore[arg-type]
    assert not out.exists()  # refused before anything is written


def test_half_a_tls_authority_is_refused_and_its_key_is_never_replaced(
        tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    issue_server_cert(state, ["10.0.0.1"], tmp_path / "a")
    key = (state / "tls-ca.key").read_bytes()
    (state / "tls-ca.pem").unlink()
    with pytest.raises(ConfigError, match="restore the TLS authority"):
        issue_server_cert(state, ["10.0.0.2"], tmp_path / "b")
    assert (state / "tls-ca.key").read_bytes() == key
    assert not (state / "tls-ca.pem").exists()
    # A certificate that is not the key's own is refused as well.
    other = tmp_path / "other"
    issue_server_cert(other, ["10.0.0.3"], tmp_path / "c")
    (state / "tls-ca.pem").write_bytes((other / "tls-ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="is not the certificate of"):
        issue_server_cert(state, ["10.0.0.2"], tmp_path / "b")


@pytest.mark.parametrize("host", ["bücher.de", "a" * 64 + ".example", ".", "..", "a..b",
                                  "x" * 254, "-", "a_b.example", ""])
def test_tls_hosts_that_are_not_dns_names_get_a_typed_error(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError):
        issue_server_cert(tmp_path / "cluster", [host], tmp_path / "out")


def test_a_long_dns_name_gets_a_certificate(tmp_path: Path) -> None:
    host = ".".join(["a" * 60] * 3)  # 182 characters: more than a CN's 64
    _, cert_path, _ = issue_server_cert(tmp_path / "cluster", [host], tmp_path / "out")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [host]


def test_node_files_refuse_before_writing_and_never_reuse_another_nodes_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "cluster"
    out = tmp_path / "files"
    for bad in (["--node", "a" * 5000], ["--node", "dock", "--tls-host", "bücher.de"]):
        assert main(["node-files", *bad, "--state-dir", str(state), "--out", str(out)]) == 1
        assert not out.exists()  # refused before any file
    assert main(["node-files", "--node", "harbor", "--state-dir", str(state),
                 "--out", str(out)]) == 0
    key = (out / "node.key").read_bytes()
    assert main(["node-files", "--node", "dock", "--state-dir", str(state),
                 "--out", str(out)]) == 1
    assert "holds the files of 'harbor', not of 'dock'" in capsys.readouterr().err
    assert (out / "node.key").read_bytes() == key
    assert load_node_config(out / "node.toml").name == "harbor"
    # The same node again renews its certificate and keeps its key.
    assert main(["node-files", "--node", "harbor", "--state-dir", str(state),
                 "--out", str(out)]) == 0
    assert (out / "node.key").read_bytes() == key
