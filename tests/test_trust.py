"""The trust primitives, pure: certificates, sealed messages, the gate's rules,
replay windows, peer tokens, identity proofs and the broker's topic rules."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import msgpack
import pytest

from cloudlet.errors import ConfigError, PeerUnverified, TrustError
from cloudlet.protocol import (
    Kind,
    Location,
    command_message,
    commands_topic,
    event_message,
    events_topic,
    location_message,
    location_topic,
    offline_message,
    parse_topic,
    presence_message,
    presence_topic,
    telemetry_message,
    telemetry_topic,
)
from cloudlet.trust import acl, peer_tokens, proof
from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_OPERATOR,
    ROLE_ORCHESTRATOR,
    CertificateAuthority,
    CertificateVerifier,
)
from cloudlet.trust.cluster import ensure_authority, issue_node, load_identity, operator_identity
from cloudlet.trust.gate import ControlGate, DropLog
from cloudlet.trust.keys import SigningKey, verify_signature
from cloudlet.trust.replay import NewestFirst, ReplayWindow
from cloudlet.trust.sealed import Identity, open_sealed, seal


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(clock: Clock) -> CertificateAuthority:
    return CertificateAuthority(SigningKey.generate(), clock=clock)


@pytest.fixture
def verifier(authority: CertificateAuthority, clock: Clock) -> CertificateVerifier:
    return CertificateVerifier(authority.public_key, clock=clock)


def identity(authority: CertificateAuthority, verifier: CertificateVerifier, subject: str,
             *roles: str) -> Identity:
    key = SigningKey.generate()
    return Identity.load(key, authority.issue(subject, roles or [ROLE_CLOUDLET],
                                              key.public_bytes), verifier)


def test_signatures_verify_and_refuse_anything_else() -> None:
    key = SigningKey.generate()
    sig = key.sign(b"data")
    assert verify_signature(key.public_bytes, sig, b"data")
    assert not verify_signature(key.public_bytes, sig, b"datA")
    assert not verify_signature(key.public_bytes, sig[:-1], b"data")
    assert not verify_signature(b"\x00" * 32, sig, b"data")
    assert not verify_signature(b"short", sig, b"data")


def test_certificates_name_their_subject_roles_and_lifetime(
        authority: CertificateAuthority, verifier: CertificateVerifier, clock: Clock) -> None:
    key = SigningKey.generate()
    wire = authority.issue("downtown", [ROLE_CLOUDLET, ROLE_ORCHESTRATOR], key.public_bytes,
                           ttl_s=100)
    cert = verifier.verify(wire)
    assert cert.subject == "downtown" and cert.public_key == key.public_bytes
    assert cert.roles == {ROLE_CLOUDLET, ROLE_ORCHESTRATOR}
    clock.now += 101
    with pytest.raises(TrustError) as info:
        verifier.verify(wire)
    assert info.value.details["reason"] == "expired_certificate"


@pytest.mark.parametrize("mutate", [
    lambda w: w[:-1],
    lambda w: w + b"x",
    lambda w: bytes([w[0] ^ 1]) + w[1:],
    lambda w: w[:20] + bytes([w[20] ^ 0x40]) + w[21:],
    lambda w: b"",
    lambda w: b"\x93\x01\x02\x03",
])
def test_tampered_certificates_are_refused(authority: CertificateAuthority,
                                           verifier: CertificateVerifier, mutate) -> None:  # type: ignore[no-untyped-def]
    wire = authority.issue("downtown", [ROLE_CLOUDLET], SigningKey.generate().public_bytes)
    with pytest.raises(TrustError):
        verifier.verify(mutate(wire))


def test_a_certificate_of_another_cluster_is_refused(verifier: CertificateVerifier,
                                                     clock: Clock) -> None:
    other = CertificateAuthority(SigningKey.generate(), clock=clock)
    wire = other.issue("downtown", [ROLE_CLOUDLET], SigningKey.generate().public_bytes)
    with pytest.raises(TrustError) as info:
        verifier.verify(wire)
    assert info.value.details["reason"] == "foreign_certificate"


def test_identity_refuses_a_certificate_for_another_key(authority: CertificateAuthority,
                                                        verifier: CertificateVerifier) -> None:
    wire = authority.issue("downtown", [ROLE_CLOUDLET], SigningKey.generate().public_bytes)
    with pytest.raises(ConfigError):
        Identity.load(SigningKey.generate(), wire, verifier)


def test_sealed_messages_are_bound_to_their_topic(authority: CertificateAuthority,
                                                  verifier: CertificateVerifier) -> None:
    me = identity(authority, verifier, "downtown")
    raw = seal(me, presence_topic("downtown"), {"hello": 1})
    opened = open_sealed(verifier, presence_topic("downtown"), raw)
    assert opened.signer.subject == "downtown" and opened.body["hello"] == 1
    with pytest.raises(TrustError) as info:
        open_sealed(verifier, presence_topic("harbor"), raw)
    assert info.value.details["reason"] == "bad_signature"


def test_a_forged_body_or_signature_is_refused(authority: CertificateAuthority,
                                               verifier: CertificateVerifier) -> None:
    me = identity(authority, verifier, "downtown")
    topic = presence_topic("downtown")
    envelope = msgpack.unpackb(seal(me, topic, {"endpoint": "http://a"}))
    forged = dict(envelope, body=msgpack.packb({**msgpack.unpackb(envelope["body"]),
                                                "endpoint": "http://evil"}))
    with pytest.raises(TrustError):
        open_sealed(verifier, topic, msgpack.packb(forged))
    # The attacker signs with its own key but presents downtown's certificate.
    evil = SigningKey.generate()
    body = envelope["body"]
    forged = dict(envelope, sig=evil.sign(b"cloudlet/v1 message\x00" + topic.encode()
                                          + b"\x00" + body))
    with pytest.raises(TrustError):
        open_sealed(verifier, topic, msgpack.packb(forged))
    for junk in (b"", b"\xc1", msgpack.packb({"v": 1, "node": "downtown"}), b"x" * 300_000):
        with pytest.raises(TrustError):
            open_sealed(verifier, topic, junk)


# --- the gate --------------------------------------------------------------------------


@pytest.fixture
def cast(authority: CertificateAuthority, verifier: CertificateVerifier) -> dict[str, Identity]:
    return {"downtown": identity(authority, verifier, "downtown"),
            "harbor": identity(authority, verifier, "harbor"),
            "leader": identity(authority, verifier, "leader", ROLE_CLOUDLET, ROLE_ORCHESTRATOR),
            "operator": identity(authority, verifier, "operator:cli", ROLE_OPERATOR)}


def presence(node: str, endpoint: str = "http://127.0.0.1:1", session: str = "s1",
             ) -> dict[str, object]:
    return presence_message(node, endpoint, session=session, position_m=(0.0, 0.0), zone="",
                            capacity={}, vms=0, refresh_s=30.0)


def reason(exc: pytest.ExceptionInfo[TrustError]) -> str:
    return str(exc.value.details["reason"])


@pytest.mark.parametrize("signer,topic,message,expected", [
    # A cloudlet speaks only for itself.
    ("downtown", presence_topic("downtown"), presence("downtown"), None),
    ("harbor", presence_topic("downtown"), presence("downtown"), "wrong_signer"),
    ("harbor", presence_topic("harbor"), presence("downtown"), "malformed"),
    ("downtown", telemetry_topic("downtown"), telemetry_message("downtown"), None),
    ("harbor", telemetry_topic("downtown"), telemetry_message("downtown"), "wrong_signer"),
    ("downtown", events_topic("downtown"), event_message("downtown", op="x"), None),
    ("operator", events_topic("downtown"), event_message("downtown", op="x"), "wrong_signer"),
    # Orders come from an orchestrator or operator, with an epoch.
    ("leader", commands_topic("downtown"), command_message("ping", command_id="1", epoch=3),
     None),
    ("operator", commands_topic("downtown"), command_message("ping", command_id="1", epoch=0),
     None),
    ("harbor", commands_topic("downtown"), command_message("ping", command_id="1", epoch=3),
     "wrong_signer"),
    ("leader", commands_topic("downtown"), {"v": 2, "op": "ping", "id": "1"}, "malformed"),
    ("leader", commands_topic("downtown"), command_message("ping", command_id="1", epoch=-1),
     "malformed"),
    # A location names its signer: "this VM is at me".
    ("downtown", location_topic("abcd"),
     location_message("abcd", Location("downtown", "http://a")), None),
    ("harbor", location_topic("abcd"),
     location_message("abcd", Location("downtown", "http://evil")), "wrong_signer"),
    ("downtown", location_topic("abcd"),
     location_message("ffff", Location("downtown", "http://a")), "malformed"),
    # Old schema.
    ("downtown", presence_topic("downtown"), {**presence("downtown"), "v": 1}, "schema"),
])
def test_gate_rules(verifier: CertificateVerifier, cast: dict[str, Identity], signer: str,
                    topic: str, message: dict[str, object], expected: str | None) -> None:
    gate = ControlGate(verifier)
    raw = seal(cast[signer], topic, message, clock=verifier.clock)
    if expected is None:
        believed = gate.admit(topic, raw)
        assert believed is not None and believed.signer.subject == cast[signer].subject
    else:
        with pytest.raises(TrustError) as info:
            gate.admit(topic, raw)
        assert reason(info) == expected
        assert gate.drops[expected] == 1


def test_gate_refuses_unknown_topics_and_ignores_clears(verifier: CertificateVerifier,
                                                        cast: dict[str, Identity]) -> None:
    gate = ControlGate(verifier)
    assert gate.admit(presence_topic("downtown"), b"") is None
    for topic in ("cloudlet/v1/nodes/downtown/other", "elsewhere/x", "cloudlet/v1/clients/a/rtt",
                  "cloudlet/v1/nodes/+/presence"):
        with pytest.raises(TrustError):
            gate.admit(topic, seal(cast["downtown"], topic, presence("downtown")))


def test_orders_are_believed_once_and_only_while_fresh(verifier: CertificateVerifier,
                                                       cast: dict[str, Identity],
                                                       clock: Clock) -> None:
    gate = ControlGate(verifier, window_s=30)
    topic = commands_topic("downtown")
    raw = seal(cast["leader"], topic, command_message("ping", command_id="1", epoch=1),
               clock=clock)
    assert gate.admit(topic, raw) is not None
    with pytest.raises(TrustError) as info:
        gate.admit(topic, raw)
    assert reason(info) == "replayed"
    old = seal(cast["leader"], topic, command_message("ping", command_id="2", epoch=1),
               clock=lambda: clock.now - 31)
    with pytest.raises(TrustError) as info:
        gate.admit(topic, old)
    assert reason(info) == "stale"
    future = seal(cast["leader"], topic, command_message("ping", command_id="3", epoch=1),
                  clock=lambda: clock.now + 31)
    with pytest.raises(TrustError):
        gate.admit(topic, future)
    # After the window, the first message is stale, not forgotten into acceptance.
    clock.now += 61
    with pytest.raises(TrustError) as info:
        gate.admit(topic, raw)
    assert reason(info) == "stale"


def test_retained_state_is_believed_only_when_newer(verifier: CertificateVerifier,
                                                    cast: dict[str, Identity],
                                                    clock: Clock) -> None:
    gate = ControlGate(verifier)
    topic = location_topic("abcd")
    at_a = seal(cast["downtown"], topic, location_message("abcd", Location("downtown", "http://a")),
                clock=clock)
    clock.now += 5
    at_b = seal(cast["harbor"], topic, location_message("abcd", Location("harbor", "http://b")),
                clock=clock)
    assert gate.admit(topic, at_a) is not None
    assert gate.admit(topic, at_b) is not None
    assert gate.admit(topic, at_b) is None  # redelivered: no news, no drop
    with pytest.raises(TrustError) as info:
        gate.admit(topic, at_a)  # an old, genuine location replayed
    assert reason(info) == "replayed"
    # Retained state is not judged by the window: a VM may sit for days.
    clock.now += 86_400
    fresh_gate = ControlGate(verifier)
    assert fresh_gate.admit(topic, at_b) is not None


def test_a_will_ends_its_own_session_only(verifier: CertificateVerifier,
                                          cast: dict[str, Identity], clock: Clock) -> None:
    gate = ControlGate(verifier)
    topic = presence_topic("downtown")
    old_will = seal(cast["downtown"], topic, offline_message("downtown", session="s0"),
                    clock=clock)
    clock.now += 1
    will = seal(cast["downtown"], topic, offline_message("downtown", session="s1"), clock=clock)
    online = seal(cast["downtown"], topic, presence("downtown", session="s1"), clock=clock)
    clock.now += 30
    refreshed = seal(cast["downtown"], topic, presence("downtown", session="s1"), clock=clock)
    assert gate.admit(topic, online) is not None
    assert gate.admit(topic, refreshed) is not None
    with pytest.raises(TrustError):
        gate.admit(topic, old_will)  # a Will of an older connection: replayed
    believed = gate.admit(topic, will)  # older than the refresh, but ends session s1
    assert believed is not None and believed.body["status"] == "offline"
    with pytest.raises(TrustError):
        gate.admit(topic, online)  # and the old online presence cannot come back


def test_replay_window_fails_closed_when_full(clock: Clock) -> None:
    window = ReplayWindow(30, clock=clock, max_nonces=2)
    window.check("a", clock.now, b"1")
    window.check("a", clock.now, b"2")
    with pytest.raises(TrustError) as info:
        window.check("a", clock.now, b"3")
    assert reason(info) == "overloaded"
    clock.now += 61  # forgotten after twice the window
    window.check("a", clock.now, b"3")
    assert len(window) == 1


def test_newest_first_never_goes_back() -> None:
    state = NewestFirst()
    state.accept("k", (10.0,), b"a")
    state.accept("k", (5.0,), b"b")  # believed by another rule: keeps time 10
    with pytest.raises(TrustError):
        state.check("k", "x", (9.0,), b"c")
    assert state.is_duplicate("k", b"b")


def test_a_vms_locations_go_by_its_moves_not_by_clocks(verifier: CertificateVerifier,
                                                       cast: dict[str, Identity],
                                                       clock: Clock) -> None:
    """A VM moves from downtown, whose clock runs 2 s ahead, to harbor: harbor's location
    (one move later) is believed though its time is earlier."""
    gate = ControlGate(verifier)
    topic = location_topic("abcd")
    at_a = seal(cast["downtown"], topic, location_message(
        "abcd", Location("downtown", "http://a"), generation=3), clock=lambda: clock.now + 2)
    at_b = seal(cast["harbor"], topic, location_message(
        "abcd", Location("harbor", "http://b"), generation=4), clock=clock)
    assert gate.admit(topic, at_a) is not None
    believed = gate.admit(topic, at_b)
    assert believed is not None and believed.body["node"] == "harbor"
    with pytest.raises(TrustError):
        gate.admit(topic, at_a)  # the older move, replayed
    for bad in (-1, 1.5, "7", True):
        raw = seal(cast["harbor"], topic, {**location_message(
            "abcd", Location("harbor", "http://b")), "generation": bad}, clock=clock)
        with pytest.raises(TrustError):
            gate.admit(topic, raw)


def test_messages_dated_ahead_are_refused(verifier: CertificateVerifier,
                                          cast: dict[str, Identity], clock: Clock) -> None:
    """Believed, a location dated a year ahead would outrank every genuine one to come."""
    gate = ControlGate(verifier, window_s=30)
    topic = location_topic("abcd")
    ahead = seal(cast["downtown"], topic, location_message(
        "abcd", Location("downtown", "http://a")), clock=lambda: clock.now + 365 * 86400)
    with pytest.raises(TrustError) as info:
        gate.admit(topic, ahead)
    assert reason(info) == "future"
    slightly = seal(cast["downtown"], topic, location_message(
        "abcd", Location("downtown", "http://a")), clock=lambda: clock.now + 5)
    assert gate.admit(topic, slightly) is not None  # within the clocks' agreement


def test_drop_log_logs_each_sender_and_reason_once() -> None:
    drops = DropLog(limit=3)
    assert drops.first("a", "stale") and not drops.first("a", "stale")
    assert drops.first("a", "replayed") and drops.first("b", "stale")
    assert not drops.first("c", "stale")  # over the limit: quiet


# --- peer tokens and proofs ----------------------------------------------------------------


def test_peer_tokens_open_only_their_audience(verifier: CertificateVerifier,
                                              cast: dict[str, Identity], clock: Clock) -> None:
    token = peer_tokens.mint(cast["downtown"], "harbor", ttl_s=60, clock=clock)
    assert peer_tokens.check(verifier, token, "harbor").subject == "downtown"
    with pytest.raises(TrustError) as info:
        peer_tokens.check(verifier, token, "campus")
    assert reason(info) == "wrong_audience"
    clock.now += 61
    with pytest.raises(TrustError) as info:
        peer_tokens.check(verifier, token, "harbor")
    assert reason(info) == "expired"


def test_peer_tokens_cannot_be_forged_or_stretched(authority: CertificateAuthority,
                                                   verifier: CertificateVerifier,
                                                   cast: dict[str, Identity],
                                                   clock: Clock) -> None:
    token = peer_tokens.mint(cast["downtown"], "harbor", clock=clock)
    wire = base64.urlsafe_b64decode(token[4:] + "==")
    cert, body, sig = msgpack.unpackb(wire)
    claims = msgpack.unpackb(body)
    for changed in ({**claims, "aud": "campus"}, {**claims, "exp": claims["exp"] + 10_000},
                    {**claims, "iss": "harbor"}):
        forged = msgpack.packb([cert, msgpack.packb(changed), sig])
        with pytest.raises(TrustError):
            peer_tokens.check(verifier, "cp1." + base64.urlsafe_b64encode(forged).decode(),
                              "harbor")
    # A token a (compromised) cloudlet signs for a long life is still refused.
    long_body = msgpack.packb({**claims, "exp": claims["iat"] + 3600})
    long_sig = cast["downtown"].sign(peer_tokens.TOKEN_DOMAIN, long_body)
    long_token = "cp1." + base64.urlsafe_b64encode(
        msgpack.packb([cert, long_body, long_sig])).decode()
    with pytest.raises(TrustError) as info:
        peer_tokens.check(verifier, long_token, "harbor")
    assert reason(info) == "expired"
    for junk in ("cp1.", "cp1.!!!", "cp1." + "A" * 5000, "Bearer x"):
        with pytest.raises(TrustError):
            peer_tokens.check(verifier, junk, "harbor")


def test_identity_proofs(verifier: CertificateVerifier, cast: dict[str, Identity],
                         clock: Clock) -> None:
    challenge = proof.new_challenge()
    answer = proof.prove(cast["harbor"], challenge)
    assert proof.check(verifier, challenge, answer, "harbor").subject == "harbor"
    assert proof.check(verifier, challenge, answer).subject == "harbor"
    with pytest.raises(TrustError) as info:
        proof.check(verifier, challenge, answer, "downtown")
    assert reason(info) == "wrong_peer"
    with pytest.raises(TrustError):
        proof.check(verifier, proof.new_challenge(), answer, "harbor")  # replayed answer
    with pytest.raises(TrustError):
        proof.check(verifier, challenge, proof.prove(cast["operator"], challenge))
    for junk in (None, {}, {"cert": 1, "sig": 2}, {"cert": "!!", "sig": "??"}):
        with pytest.raises(TrustError):
            proof.check(verifier, challenge, junk)
    with pytest.raises(TrustError):
        proof.parse_challenge("zz")
    with pytest.raises(TrustError):
        proof.parse_challenge("00")


# --- the broker's rules --------------------------------------------------------------------


@pytest.mark.parametrize("user,topic,publish,receive", [
    ("node.downtown", "cloudlet/v1/nodes/downtown/presence", True, True),
    ("node.downtown", "cloudlet/v1/nodes/harbor/presence", False, True),
    ("node.downtown", "cloudlet/v1/nodes/harbor/commands", True, True),
    ("node.downtown", "cloudlet/v1/vms/abcd/location", True, True),
    ("node.downtown", "cloudlet/v1/clients/alice/rtt", False, True),
    ("node.downtown", "$SYS/broker/uptime", False, False),
    ("operator", "cloudlet/v1/nodes/harbor/commands", True, True),
    ("alice", "cloudlet/v1/clients/alice/rtt", True, True),
    ("alice", "cloudlet/v1/clients/bob/rtt", False, False),
    ("alice", "cloudlet/v1/nodes/downtown/commands", False, False),
    ("alice", "cloudlet/v1/nodes/downtown/presence", False, True),
    ("alice", "cloudlet/v1/nodes/downtown/telemetry", False, False),
    ("alice", "cloudlet/v1/vms/abcd/location", False, True),
    ("a/b", "cloudlet/v1/clients/a/b/rtt", False, False),
    ("+", "cloudlet/v1/clients/x/rtt", False, False),
])
def test_broker_topic_rules(user: str, topic: str, publish: bool, receive: bool) -> None:
    assert acl.may_publish(user, topic) is publish
    assert acl.may_receive(user, topic) is receive


@pytest.mark.parametrize("user,filter_,allowed", [
    ("alice", "cloudlet/v1/#", False),
    ("alice", "#", False),
    ("alice", "cloudlet/v1/nodes/+/presence", True),
    ("alice", "cloudlet/v1/nodes/+/+", False),
    ("alice", "cloudlet/v1/vms/abcd/location", True),
    ("alice", "cloudlet/v1/clients/alice/#", True),
    ("alice", "cloudlet/v1/clients/+/rtt", False),
    ("node.downtown", "cloudlet/v1/#", True),
    ("node.downtown", "#", False),
])
def test_broker_subscription_rules(user: str, filter_: str, allowed: bool) -> None:
    assert acl.may_subscribe(user, filter_) is allowed


def test_mosquitto_password_lines_are_pbkdf2_sha512() -> None:
    line = acl.mosquitto_password_line("alice", "secret1", salt=b"\x01" * 12)
    user, rest = line.split(":", 1)
    _, alg, iterations, salt, digest = rest.split("$")
    assert (user, alg, iterations) == ("alice", "7", "101")
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac(
        "sha512", b"secret1", base64.b64decode(salt), 101)


def test_derived_passwords_differ_by_user_and_secret() -> None:
    a = acl.derived_password(b"s" * 32, "node.downtown")
    assert a == acl.derived_password(b"s" * 32, "node.downtown")
    assert a != acl.derived_password(b"s" * 32, "node.harbor")
    assert a != acl.derived_password(b"t" * 32, "node.downtown")


def test_cluster_files_round_trip(tmp_path: Path) -> None:
    authority = ensure_authority(tmp_path)
    assert ensure_authority(tmp_path).public_key == authority.public_key  # kept
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    key_path, cert_path = issue_node(authority, "downtown", [ROLE_CLOUDLET], tmp_path / "n")
    verifier = CertificateVerifier(authority.public_key)
    me = load_identity(key_path, cert_path, verifier)
    assert me.subject == "downtown"
    key_before = key_path.read_text()
    issue_node(authority, "downtown", [ROLE_CLOUDLET], tmp_path / "n")
    assert key_path.read_text() == key_before  # the key is kept, the certificate renewed
    op = operator_identity(authority)
    assert op.cert.has_role(ROLE_OPERATOR) and not op.cert.has_role(ROLE_CLOUDLET)


def test_topics_parse() -> None:
    assert parse_topic("cloudlet/v1/nodes/a/presence") is not None
    ref = parse_topic("cloudlet/v1/vms/abcd/location")
    assert ref is not None and ref.kind is Kind.LOCATION and ref.name == "abcd"
    for bad in ("cloudlet/v1/nodes/a/b/presence", "cloudlet/v2/nodes/a/presence",
                "cloudlet/v1/vms/a/presence", "cloudlet/v1/nodes//presence"):
        assert parse_topic(bad) is None


def test_only_a_proven_cloudlet_vouches_for_where_its_vm_went() -> None:
    """The SDK follows a `moved` notice without a challenge only on the word of a
    cloudlet that proved itself (it holds the cluster's secret, so its word adds no
    risk, and it proved the destination before moving the VM there)."""
    from cloudlet.trust.client_tokens import ClientTokens
    from mobile_client.transport import Http

    authority = CertificateAuthority(SigningKey.generate())  # real time: the SDK's clock
    verifier = CertificateVerifier(authority.public_key)
    token = ClientTokens(b"s" * 32, authority.public_key).issue("alice", 60)
    http = Http(token)
    a, b = identity(authority, verifier, "a"), identity(authority, verifier, "b")
    at_a, at_b = Location("a", "http://10.0.0.1:1"), Location("b", "http://10.0.0.2:1")
    stranger, elsewhere = Location("x", "http://10.0.0.9:1"), Location("y", "http://10.0.0.8:1")
    http.vouch(elsewhere, by=stranger)  # nobody proven: no word counts
    assert http.proven(elsewhere) is None
    challenge = proof.new_challenge()
    http.check_proof(at_a, challenge, proof.prove(a, challenge))
    assert http.proven(at_a) == at_a
    http.vouch(at_b, by=at_a)
    assert http.proven(at_b) == at_b
    assert http.proven(Location("c", at_b.endpoint)) is None  # vouched as b, not as c
    http.vouch(Location(elsewhere.endpoint, elsewhere.endpoint), by=at_a)  # an unnamed URL
    assert http.proven(Location("y", elsewhere.endpoint)) is None
    with pytest.raises(PeerUnverified):  # a proof by the wrong key is still refused
        challenge = proof.new_challenge()
        http.check_proof(Location("a", "http://10.0.0.3:1"), challenge,
                         proof.prove(b, challenge))
