"""A security review of the zero-trust layer, as attacks with real processes.

Each test is an attack found in a review by someone who did not write the code;
its docstring names the finding (F1, F2, ...). Every test passes when the attack
is REFUSED: the holes the review found are closed, and each test shows it (it
failed while the hole was open). `test_held_...` tests are attacks that were
refused all along. What is left open is in docs/security.md, "What is not promised".

Real processes throughout: `cloudlet agent` daemons (tests/daemons.py), a real
`cloudlet up` metro where the broker matters, and plain HTTP servers playing the
attacker's endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cloudlet.errors import PeerUnverified
from cloudlet.migration import run_source
from cloudlet.protocol import (
    Location,
    command_message,
    commands_topic,
    events_topic,
    location_message,
    location_topic,
)
from cloudlet.trust import peer_tokens
from cloudlet.trust.cluster import load_authority, operator_identity
from cloudlet.trust.sealed import seal
from cloudlet.vm import VM, ImageStore
from edge_agent.live_migration import WebSocketChannel
from mobile_client import CloudletClient
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, cloudlet_identity, make_daemon, sealed_body
from tests.metro import (
    NODES,
    Metro,
    Recorder,
    generated_mosquitto,
    mqtt,
    running_metro,
    serve,
)
from tests.waiting import async_wait_until, wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KVSTORE = WORKLOADS / "kvstore.wasm"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def start(d: Daemon, started: list[Daemon]) -> Daemon:
    started.append(d)
    return d.start()


@pytest.fixture
def recorders() -> Iterator[Callable[..., Recorder]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def make(respond: Any = None, port: int = 0) -> Recorder:
        record = Recorder(respond)
        servers.append(serve(record, port))
        return record

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def local_vm(tmp: Path, owner: str = "mallory") -> tuple[VM, bytes]:
    """A VM run by the attacker itself (no cloudlet needed to make one)."""
    wasm = KVSTORE.read_bytes()
    image = ImageStore(tmp / "attacker-images").add(wasm)
    vm = VM.create(image, owner=owner)
    vm.call("kv_put", 1, 99)
    return vm, wasm


async def migrate_in(target: Daemon, token: str, vm: VM, wasm: bytes,
                     migration_id: str) -> str:
    """Act as a source cloudlet: live-migrate `vm` into `target` over its peer route,
    with a migration id of the attacker's choosing. Returns the outcome."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{target.endpoint}/v1/peer/migrate", params={"endpoint": "http://127.0.0.1:9"},
            headers={"Authorization": f"Bearer {token}"}, max_msg_size=64 << 20) as ws:
        stats = await run_source(vm, WebSocketChannel(ws), migration_id=migration_id,
                                 image_wasm=wasm, deadline_s=20.0)
    return stats.outcome


# --- F1: a peer's migration id is a path (fixed on this branch: now refused) -------------------


def test_f1_a_peer_migration_id_cannot_name_a_directory_on_the_destination(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    """F1 (high; fixed). The live-migration destination used the source's
    `migration_id` unchecked as a directory name, `STATE/incoming/<migration_id>`:
    it wrote the rounds there and `shutil.rmtree`d it when the migration ended (at
    once on an abort, one checkpoint interval after a commit). `Path(incoming) /
    "/abs/dir"` is `/abs/dir`, and `..` walks up, so any holder of a peer token for a
    cloudlet (a compromised cloudlet, which the threat model says "signs only as
    itself") made it delete any directory its user could: one outside the cloudlet
    (absolute path), one next to it (`../..`), and its own state directory (`..`:
    node key, config, every client's VM checkpoints). Commit 98f1921's version of
    this test shows all three deleted. Now an offer whose ids are not letters,
    digits, '-' or '_' is refused, and nothing moves or goes."""
    campus = start(make_daemon(tmp_path, "campus"), daemons)
    alice = campus.token("alice")
    status, body = campus.request("POST", "/v1/images", raw=KVSTORE.read_bytes(), token=alice)
    assert status == 201, body
    status, body = campus.request("POST", "/v1/vms", {"image": body["digest"]}, token=alice)
    assert status == 201, body
    alices_vm = body["vm"]
    assert wait_until(lambda: (campus.state_dir / "vms" / f"{alices_vm}.snap").exists())

    # Directories the attacker wants gone. Each holds a file, to show it is real data.
    absolute = tmp_path / "elsewhere" / "precious"
    relative = tmp_path / "beside-the-cloudlet"
    for d in (absolute, relative):
        d.mkdir(parents=True)
        (d / "data.txt").write_text("irreplaceable")

    # The attacker: a cloudlet of the cluster (its own key and certificate), nothing more.
    mallory = cloudlet_identity(campus.cluster_dir, "mallory")
    for migration_id in (str(absolute), "../../beside-the-cloudlet", ".."):
        vm, wasm = local_vm(tmp_path)
        token = peer_tokens.mint(mallory, "campus")
        assert asyncio.run(migrate_in(campus, token, vm, wasm, migration_id)) == "aborted"
    time.sleep(1.5)  # past the checkpoint interval (0.5 s), when a commit would delete
    assert (absolute / "data.txt").exists() and (relative / "data.txt").exists()
    assert (campus.state_dir / "node.key").exists()
    assert (campus.state_dir / "vms" / f"{alices_vm}.snap").exists()
    # A well-formed id still migrates in.
    vm, wasm = local_vm(tmp_path)
    assert asyncio.run(migrate_in(campus, peer_tokens.mint(mallory, "campus"), vm, wasm,
                                  "0123456789abcdef")) == "committed"


def test_f1b_a_peer_vm_id_cannot_be_a_path(tmp_path: Path, daemons: list[Daemon]) -> None:
    """F1b (medium; fixed). A VM id from a peer (a handed-over snapshot on
    `POST /v1/peer/vms`, or a live migration's Offer) was used unchecked in
    `STATE/vms/<id>.snap`: a peer wrote a checkpoint (VM memory it chose) to any
    `*.snap` path the daemon's user could write (commit 98f1921 shows it). Refused now."""
    import dataclasses

    campus = start(make_daemon(tmp_path, "campus"), daemons)
    token = peer_tokens.mint(cloudlet_identity(campus.cluster_dir, "mallory"), "campus")
    vm, wasm = local_vm(tmp_path)
    assert campus.request("POST", "/v1/images", raw=wasm, token=token)[0] == 201
    target = tmp_path / "outside-the-cloudlet" / "planted"
    target.parent.mkdir()
    for vm_id in (str(target), "../../outside-the-cloudlet/planted", "a/../b"):
        snap = dataclasses.replace(vm.snapshot(), vm_id=vm_id)
        status, body = campus.request("POST", "/v1/peer/vms", raw=snap.to_bytes(), token=token)
        assert (status, body["code"]) == (400, "bad_call"), body
    assert not Path(f"{target}.snap").exists()
    assert list(target.parent.iterdir()) == []


# --- F2: a proof is cached by address; F3: a proof followed redirects (fixed) ----------------


def test_f2_a_squatter_on_a_dead_cloudlets_address_must_prove_itself(
        tmp_path: Path, daemons: list[Daemon],
        recorders: Callable[..., Recorder]) -> None:
    """F2 (medium). The SDK used to remember a proof per address for 300 s, whatever
    happened to the address: the cloudlet dies, anything that binds its port gets the
    client's bearer token with no challenge. Now a proof lasts 60 s at most and is
    forgotten when a request to the endpoint fails in transport or a new connection
    to it is opened: the squatter is challenged, cannot answer, and gets no token.
    (Left open: a squatter that binds the port before the client's first request
    after the death; docs/security.md. TLS closes it.)"""
    harbor = start(make_daemon(tmp_path, "harbor"), daemons)
    token = harbor.token("victim")

    async def scenario() -> Recorder:
        async with CloudletClient(token, endpoints=[harbor.endpoint]) as client:
            first = await client.offload(KVSTORE, "kv_put", (1, 5))
            assert first.where == "harbor"
            harbor.kill()  # the cloudlet dies (or moves away)...
            with pytest.raises(Exception):  # noqa: B017 - nothing answers there now
                await client.offload(KVSTORE, "kv_put", (1, 6))
            squatter = recorders(port=harbor.port)  # ...and something else takes its port
            for _ in range(3):
                with pytest.raises(Exception):  # noqa: B017 - it cannot prove it is harbor
                    await client.offload(KVSTORE, "kv_put", (1, 7))
            return squatter

    squatter = asyncio.run(scenario())
    assert squatter.credentials_seen() == []
    assert squatter.requests and all(p.startswith("/health?challenge=")
                                     for _, p, _ in squatter.requests), squatter.requests

def test_f3_a_plain_redirect_does_not_pass_the_identity_proof(
        tmp_path: Path, daemons: list[Daemon],
        recorders: Callable[..., Recorder]) -> None:
    """F3 (medium; fixed on this branch). Every HTTP client here followed redirects
    (aiohttp's default), the proof request included. An endpoint that is not a
    cloudlet answered `GET /health?challenge=X` with `307 Location: <any real
    cloudlet>/health?challenge=X`; aiohttp followed, the real cloudlet signed the
    challenge, and the SDK recorded the *impostor's* address as proven: the next
    request took the bearer token to the impostor. No relay code, no key: one
    redirect (commit 98f1921's version of this test shows it). Redirects are no longer
    followed (a cloudlet never sends one); the impostor sees challenges, no token."""
    harbor = start(make_daemon(tmp_path, "harbor"), daemons)
    token = harbor.token("victim")

    def respond(method: str, path: str, headers: dict[str, str]
                ) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/health"):
            return 307, {"Location": harbor.endpoint + path}, b""
        return 500, {"Content-Type": "application/json"}, b'{"code": "internal_error"}'

    impostor = recorders(respond)

    async def scenario() -> None:
        async with CloudletClient(token, endpoints=[impostor.endpoint]) as client:
            with pytest.raises(Exception):  # noqa: B017
                await client.offload(KVSTORE, "kv_put", (1, 5))

    asyncio.run(scenario())
    assert impostor.requests and impostor.credentials_seen() == []
    assert {p.split("?")[0] for _, p, _ in impostor.requests} == {"/health"}


def test_f3b_a_redirecting_endpoint_gets_no_vm_and_no_peer_token(
        tmp_path: Path, daemons: list[Daemon],
        recorders: Callable[..., Recorder]) -> None:
    """F3b (medium; fixed on this branch). The same on the daemon side
    (`PeerClient.prove` followed redirects): a named endpoint that only redirected its
    `/health` to a real cloudlet (harbor) received the VM's whole snapshot and a peer
    token for harbor, which then opened harbor's peer routes for a minute (every VM
    of every client). Here the operator names the endpoint (a typo, a stale
    address); a squatter on the address of a cloudlet whose signed presence is
    still fresh got the same. Commit 98f1921's version of this test shows it."""
    import msgpack

    downtown = start(make_daemon(tmp_path, "downtown"), daemons)
    harbor = start(make_daemon(tmp_path, "harbor"), daemons)
    alice = downtown.token("alice")
    status, body = downtown.request("POST", "/v1/images", raw=KVSTORE.read_bytes(), token=alice)
    digest = body["digest"]
    status, body = downtown.request("POST", "/v1/vms", {"image": digest}, token=alice)
    vm = body["vm"]
    assert downtown.request("POST", f"/v1/vms/{vm}/call", {"fn": "kv_put", "args": [7, 1234]},
                            token=alice)[0] == 200

    def respond(method: str, path: str, headers: dict[str, str]
                ) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/health"):
            return 307, {"Location": harbor.endpoint + path}, b""
        if path == "/v1/images":
            return 200, {"Content-Type": "application/msgpack"}, msgpack.packb(
                {"images": [digest]})
        return 500, {"Content-Type": "application/msgpack"}, msgpack.packb(
            {"code": "internal_error", "message": "x"})

    impostor = recorders(respond)
    status, body = downtown.request("POST", f"/v1/vms/{vm}/migrate",
                                    {"endpoint": impostor.endpoint, "mode": "stop_and_copy"},
                                    token=downtown.operator_token())
    assert (status, body["code"]) == (502, "peer_unverified"), body
    assert [(m, p.split("?")[0]) for m, p, _ in impostor.requests] == [("GET", "/health")]
    assert impostor.credentials_seen() == []


def relay_to(real: str) -> Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes]]:
    """An attacker's endpoint that fetches `/health` (with the challenge) from a real
    cloudlet and answers with it: the "identity, not address" relay."""
    import urllib.request

    def respond(method: str, path: str, headers: dict[str, str]
                ) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/health"):
            with urllib.request.urlopen(real + path, timeout=5) as resp:
                return 200, {"Content-Type": "application/json"}, resp.read()
        return 500, {"Content-Type": "application/json"}, b'{"code": "internal_error"}'
    return respond


def test_f4_an_unproven_endpoint_cannot_steer_the_sdk_with_vm_moved(
        tmp_path: Path, daemons: list[Daemon],
        recorders: Callable[..., Recorder]) -> None:
    """F4 (low-medium; fixed on this branch). Before it sends a token the SDK asks the
    endpoint's `/health`, unauthenticated; an error answer to that was turned into the
    daemon's typed error, and `VMMoved` was *followed* (`attach`, `Session._find_vm`,
    `Http.delete_vm`). So a server that proved nothing (a squatter, a stale list
    entry) chose where the SDK went next, and the node name it expected there.
    docs/security.md: relays need an address "placed there by the cluster itself"
    (signed presence, signed locations, the operator, a cloudlet's own answers); this
    was none of those. Pointed at a relay, the token followed (commit 98f1921's
    version of this test). Now such an answer is `PeerUnverified`, and followed nowhere."""
    harbor = start(make_daemon(tmp_path, "harbor"), daemons)
    token = harbor.token("victim")
    relay = recorders(relay_to(harbor.endpoint))

    def moved(method: str, path: str, headers: dict[str, str]
              ) -> tuple[int, dict[str, str], bytes]:
        body = {"code": "vm_moved", "message": "moved",
                "details": {"vm": "x", "node": "harbor", "endpoint": relay.endpoint}}
        return 410, {"Content-Type": "application/json"}, json.dumps(body).encode()

    squatter = recorders(moved)

    async def scenario() -> None:
        async with CloudletClient(token, endpoints=[harbor.endpoint]) as client:
            with pytest.raises(PeerUnverified):
                async with client.attach("0123456789abcdef", squatter.endpoint):
                    pass

    asyncio.run(scenario())
    assert squatter.credentials_seen() == []  # it only answered an unauthenticated /health
    assert relay.requests == []  # and was not followed



# --- F8: a client's synthesized VM escapes the per-call deadline cap --------------------------

SPIN = """(module (memory (export "memory") 1)
  (func (export "spin") (loop $l (br $l))))"""


def test_f8_a_synthesized_vm_cannot_bring_limits_a_create_would_refuse(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    """F8 (medium; two client tokens). `POST /v1/vms` caps a VM's `deadline_ms` at 90%
    of the request deadline, so a call holds a call thread for seconds at most, and
    fair turns (edge_agent/workers.py) then bound every other client's wait.
    `POST /v1/vms/synthesize` took the limits from the client's snapshot as they
    were: a day per call, so two client names held both call threads for a day.
    Now a snapshot's limits pass the same checks as a create's: refused."""
    import dataclasses

    from cloudlet.vm import Snapshot, VMLimits
    from tests.conftest import wat

    campus = start(make_daemon(tmp_path, "campus", request_deadline_s=3.0), daemons)
    for name in ("mallory", "trudy"):
        token = campus.token(name)
        status, body = campus.request("POST", "/v1/images", raw=wat(SPIN), token=token)
        assert status == 201, body
        digest = body["digest"]
        status, body = campus.request("POST", "/v1/vms", {
            "image": digest, "limits": {"deadline_ms": 86_400_000}}, token=token)
        assert status == 400  # the cap, on the front door
        status, body = campus.request("POST", "/v1/vms", {"image": digest}, token=token)
        assert status == 201, body
        status, raw = campus.request("GET", f"/v1/vms/{body['vm']}/snapshot", token=token)
        assert status == 200
        snap = Snapshot.from_bytes(raw, 64 << 20)
        day = VMLimits(memory_bytes=snap.limits.memory_bytes, fuel_per_call=None,
                       deadline_ms=86_400_000)
        forged = dataclasses.replace(snap, limits=day).to_bytes()
        status, body = campus.request("POST", "/v1/vms/synthesize", raw=forged, token=token)
        assert (status, body["code"]) == (400, "bad_call"), body  # the side door, shut
        assert "deadline_ms" in body["message"]
    assert campus.request("GET", "/health")[0] == 200


# --- F9: orders are believed once per process, not once ----------------------------------------


def test_f9_an_order_replayed_after_a_restart_is_refused(
        tmp_path: Path, embedded_broker: str) -> None:
    """F9 (low). Seen nonces live only in memory (`ReplayWindow`), and the fencing
    epoch admits the same epoch again: a genuine signed order replayed after the
    cloudlet restarted, within `control_window_s`, ran a second time. Now an order
    signed before the cloudlet's control plane started is refused."""
    from tests.test_control_plane import collect

    d = make_daemon(tmp_path, "cp9", broker_url=embedded_broker, mqtt_keepalive_s=2).start()
    try:
        commands, events = "cloudlet/v1/nodes/cp9/commands", "cloudlet/v1/nodes/cp9/events"
        order = seal(operator_identity(load_authority(d.cluster_dir)), commands,
                     command_message("checkpoint", command_id="only-once", epoch=1))

        def carried_out() -> int:
            got = collect(embedded_broker, [events],
                          lambda g: any(p and p.get("id") == "only-once" for _, p, _ in g),
                          timeout_s=5.0, publish=[(commands, order)])
            return sum(1 for _, p, _ in got if p and p.get("id") == "only-once")

        assert wait_until(lambda: d.request("GET", "/metrics", token=d.token("x"))[1]
                          .find(b"cloudlet_mqtt_connected 1.0") >= 0)
        assert carried_out() == 1
        assert carried_out() == 0  # a replay, refused: as promised
        d.stop()
        d.start()
        assert wait_until(lambda: d.request("GET", "/metrics", token=d.token("x"))[1]
                          .find(b"cloudlet_mqtt_connected 1.0") >= 0)
        assert carried_out() == 0  # the same bytes, after a restart: refused too
    finally:
        d.kill()


# --- F10: images are shared by every client of a cloudlet --------------------------------------


def test_f10_a_client_neither_lists_nor_deletes_another_clients_image(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    """F10 (low; any client). `GET /v1/images` listed every client's uploads (digests of
    their code) and `DELETE /v1/images/{digest}` removed another client's image. Now a
    client sees and deletes only what it uploaded; an image two clients uploaded stays
    until both delete it."""
    harbor = start(make_daemon(tmp_path, "harbor"), daemons)
    alice, bob = harbor.token("alice"), harbor.token("bob")
    status, body = harbor.request("POST", "/v1/images", raw=KVSTORE.read_bytes(), token=alice)
    assert status == 201, body
    digest = body["digest"]
    status, listing = harbor.request("GET", "/v1/images", token=bob)
    assert status == 200 and digest not in listing["images"]
    status, body = harbor.request("DELETE", f"/v1/images/{digest}", token=bob)
    assert (status, body["code"]) == (404, "image_not_found"), body
    status, body = harbor.request("POST", "/v1/vms", {"image": digest}, token=alice)
    assert status == 201, body  # still hers
    assert digest in harbor.request("GET", "/v1/images", token=alice)[1]["images"]
    # Both upload it: bob's delete drops his hold only; alice's VM-less image stays hers.
    assert harbor.request("POST", "/v1/images", raw=KVSTORE.read_bytes(), token=bob)[0] == 201
    assert harbor.request("DELETE", f"/v1/images/{digest}", token=bob)[0] == 204
    assert digest in harbor.request("GET", "/v1/images", token=alice)[1]["images"]
    assert digest not in harbor.request("GET", "/v1/images", token=bob)[1]["images"]


# --- what held up ------------------------------------------------------------------------------
# Attacks tried in review that the code refuses. These pass when the attack FAILS.


def test_held_malformed_control_messages_are_refused_not_crashed() -> None:
    """Deep nesting, a body over the cap, NaN/inf/bool timestamps, bool/float/huge
    epochs, odd certificate subjects: each a `TrustError`, never another exception."""
    import math

    import msgpack

    from cloudlet.errors import TrustError
    from cloudlet.protocol import presence_topic
    from cloudlet.trust.certs import CertificateAuthority, CertificateVerifier
    from cloudlet.trust.gate import ControlGate
    from cloudlet.trust.keys import SigningKey
    from cloudlet.trust.sealed import MESSAGE_DOMAIN, Identity

    ca = CertificateAuthority(SigningKey.generate())
    verifier = CertificateVerifier(ca.public_key)
    key = SigningKey.generate()
    leader = Identity.load(key, ca.issue("leader", ["cloudlet", "orchestrator"],
                                         key.public_bytes), verifier)

    def raw_seal(topic: str, body: dict[str, Any]) -> bytes:
        packed: bytes = msgpack.packb(body)
        sig = key.sign(MESSAGE_DOMAIN + topic.encode() + b"\x00" + packed)
        wire: bytes = msgpack.packb({"v": 2, "cert": leader.cert.wire, "body": packed,
                                     "sig": sig})
        return wire

    topic = commands_topic("downtown")
    now = time.time()
    base = {"v": 2, "op": "ping", "id": "x", "nonce": b"n" * 12}
    cases = {
        "deep": b"\x91" * 100_000 + b"\xc0",
        "huge": b"\xc6" + (300_000).to_bytes(4, "big") + b"\0" * 300_000,
        "nan": raw_seal(topic, {**base, "ts": math.nan, "epoch": 1}),
        "inf": raw_seal(topic, {**base, "ts": math.inf, "epoch": 1}),
        "bool ts": raw_seal(topic, {**base, "ts": True, "epoch": 1}),
        "bool epoch": raw_seal(topic, {**base, "ts": now, "epoch": True}),
        "float epoch": raw_seal(topic, {**base, "ts": now, "epoch": 2.0}),
        "negative epoch": raw_seal(topic, {**base, "ts": now, "epoch": -(1 << 63)}),
        "deep body": raw_seal(topic, {**base, "ts": now, "epoch": 1,
                                      "x": [[[[[[[[[[[]]]]]]]]]]]}),
    }
    refused = {}
    for name, raw in cases.items():
        try:
            ControlGate(verifier).admit(topic, raw)
            refused[name] = "believed"
        except TrustError as exc:
            refused[name] = exc.details["reason"]
    # Only the well-formed deep body passes (depth is not a rule; msgpack caps it).
    assert refused == {"deep": "malformed", "huge": "too_large", "nan": "malformed",
                       "inf": "malformed", "bool ts": "malformed", "bool epoch": "malformed",
                       "float epoch": "malformed", "negative epoch": "malformed",
                       "deep body": "believed"}, refused
    # A certificate whose subject is a wildcard can never speak for a real topic.
    wild = SigningKey.generate()
    plus = Identity.load(wild, ca.issue("+", ["cloudlet"], wild.public_bytes), verifier)
    for t in (presence_topic("+"), presence_topic("downtown")):
        with pytest.raises(TrustError):
            ControlGate(verifier).admit(t, seal(plus, t, {"v": 2, "node": "+",
                                                         "status": "online"}))


def test_held_the_health_proof_is_no_signing_oracle(tmp_path: Path,
                                                     daemons: list[Daemon]) -> None:
    """`/health?challenge=` signs 16-64 bytes of the asker's choice. Ask it to sign the
    body of a peer token (55 bytes here) and use the signature as the token's: refused,
    because each use signs under its own domain string (none a prefix of another)."""
    import base64

    import msgpack

    from cloudlet.trust import proof
    from cloudlet.trust.certs import CERT_DOMAIN
    from cloudlet.trust.sealed import MESSAGE_DOMAIN

    domains = [proof.PROOF_DOMAIN, peer_tokens.TOKEN_DOMAIN, MESSAGE_DOMAIN, CERT_DOMAIN]
    assert not any(a != b and b.startswith(a) for a in domains for b in domains)
    campus = start(make_daemon(tmp_path, "campus"), daemons)
    harbor = start(make_daemon(tmp_path, "harbor"), daemons)
    now = int(time.time())
    body = msgpack.packb({"iss": "campus", "aud": "harbor", "iat": now, "exp": now + 60,
                          "nonce": b"12345678"})
    assert 16 <= len(body) <= 64
    status, health = campus.request("GET", f"/health?challenge={body.hex()}")
    assert status == 200
    answer = health["identity"]
    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    token = "cp1." + base64.urlsafe_b64encode(msgpack.packb(
        [unb64(answer["cert"]), body, unb64(answer["sig"])])).rstrip(b"=").decode()
    status, refused = harbor.request("GET", "/v1/peer/vms", token=token)
    assert (status, refused["code"]) == (401, "unauthorized"), refused


def test_held_peer_credentials_are_bound_and_typed(tmp_path: Path,
                                                   daemons: list[Daemon]) -> None:
    """An operator token may not send VMs; a client token is no peer's; a token for
    another cloudlet, or a stale one, opens nothing."""
    campus = start(make_daemon(tmp_path, "campus"), daemons)
    peer = cloudlet_identity(campus.cluster_dir, "harbor")
    attempts = {
        "operator on /v1/peer/migrate": (campus.operator_token(), "/v1/peer/migrate"),
        "client on /v1/peer/vms": (campus.token("alice"), "/v1/peer/vms"),
        "for another audience": (peer_tokens.mint(peer, "downtown"), "/v1/peer/vms"),
        "expired": (peer_tokens.mint(peer, "campus", clock=lambda: time.time() - 120),
                    "/v1/peer/vms"),
        "from the future": (peer_tokens.mint(peer, "campus", clock=lambda: time.time() + 120),
                            "/v1/peer/vms"),
    }
    statuses = {name: campus.request("GET", path, token=token)[0]
                for name, (token, path) in attempts.items()}
    assert statuses == {"operator on /v1/peer/migrate": 403, "client on /v1/peer/vms": 403,
                        "for another audience": 401, "expired": 401,
                        "from the future": 401}, statuses


# --- on a real `cloudlet up` metro ------------------------------------------------------------
# (the module's own metro, as tests/test_security.py starts one)

TEN_YEARS_S = 10 * 365 * 86400


@pytest.fixture(scope="module")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metro]:
    with running_metro(tmp_path_factory.mktemp("metro")) as running:
        yield running


def test_f5_a_future_dated_location_pins_nothing(metro: Metro) -> None:
    """F5 (medium; an insider: one compromised cloudlet). Retained state was believed
    when newer than what was believed, with no bound on how far in the future its
    signed `ts` might be: "VM X is on me", dated ten years ahead, pinned the VM's
    location for every receiver, the genuine host's correction after a real move was
    dropped, and the owner's session was lost. Now a message dated ahead of the
    receiver's clock (beyond the window) is refused, locations are ordered by the
    VM's moves first, and the SDK checks a location before it trusts it."""
    token = metro.token("gina")

    async def scenario() -> dict[str, Any]:
        async with CloudletClient(token, broker=metro.broker_url) as client:
            await client.discovery.wait_for(lambda d: len(d.online()) == 3, 15)
            async with client.session(KVSTORE, keep=True) as s:
                await s.call("kv_put", 1, 7)
                assert await async_wait_until(
                    lambda: client.discovery.location_of(s.vm_id) is not None)
                home = s.location.node
                liar, other = (n for n in NODES if n != home)
                topic = location_topic(s.vm_id)
                lie = seal(metro.node_identity(liar), topic,
                           location_message(s.vm_id, Location(liar, metro.endpoints[liar])),
                           clock=lambda: time.time() + TEN_YEARS_S)
                await mqtt(metro.broker_url, login=metro.broker_login(f"node.{liar}"),
                           publish=[(topic, lie, True)])
                assert await async_wait_until(
                    lambda: client.discovery.dropped.get("future", 0) >= 1)
                assert client.discovery.location_of(s.vm_id).node == home  # type: ignore[union-attr]
                # The owner moves the VM for real; its new host publishes where it is.
                status, body = await asyncio.to_thread(
                    metro.request, home, "POST", f"/v1/vms/{s.vm_id}/migrate", {"to": other},
                    token=token)
                assert status == 200, body
                assert await async_wait_until(
                    lambda: client.discovery.location_of(s.vm_id).node == other)  # type: ignore[union-attr]
                return {"value": await s.call("kv_get", 1, deadline_ms=30_000),
                        "node": s.location.node, "other": other}

    out = asyncio.run(scenario())
    assert out["value"] == 7 and out["node"] == out["other"]


def test_f5b_honest_clocks_a_second_apart_keep_a_vms_location() -> None:
    """F5b (low-medium). The same rule with honest cloudlets: a VM moving from A to B
    within A's clock lead over B had its genuine new location dropped as older. Now a
    location carries the VM's moves, and the one after a move is newer whatever the
    clocks say."""
    from cloudlet.errors import TrustError
    from cloudlet.trust.certs import CertificateAuthority, CertificateVerifier
    from cloudlet.trust.gate import ControlGate
    from cloudlet.trust.keys import SigningKey
    from cloudlet.trust.sealed import Identity

    ca = CertificateAuthority(SigningKey.generate())
    verifier = CertificateVerifier(ca.public_key)

    def cloudlet(name: str) -> Identity:
        key = SigningKey.generate()
        return Identity.load(key, ca.issue(name, ["cloudlet"], key.public_bytes), verifier)

    a, b = cloudlet("a"), cloudlet("b")
    gate = ControlGate(verifier)
    topic = location_topic("vm1")
    now = time.time()
    gate.admit(topic, seal(a, topic, location_message("vm1", Location("a", "http://a"),
                                                      generation=0),
                           clock=lambda: now + 1.0))  # A's clock runs 1 s ahead
    believed = gate.admit(topic, seal(b, topic, location_message(  # B, 0.2 s later
        "vm1", Location("b", "http://b"), generation=1), clock=lambda: now + 0.2))
    assert believed is not None and believed.body["node"] == "b"
    with pytest.raises(TrustError) as refused:  # and A's older one cannot come back
        gate.admit(topic, seal(a, topic, location_message("vm1", Location("a", "http://a"),
                                                          generation=0),
                               clock=lambda: now + 1.5))
    assert refused.value.details["reason"] == "replayed"


def test_f6b_on_mosquitto_no_client_kicks_a_cloudlet_off(
        metro: Metro, tmp_path: Path) -> None:
    """F6b (medium; any client with broker credentials). With the Mosquitto that
    `cloudlet broker-config` configured, client ids were not bound to users: a client
    connecting with `cloudlet-NAME` took the cloudlet's session over, Mosquitto
    published its Will, and everyone saw it offline. Now the generated config makes a
    client id its username: the client's connection is its own. (Here a stand-in for
    the daemon: node.downtown's own login, identifier and Will.)"""

    import aiomqtt

    node, operator = metro.broker_login("node.downtown"), metro.broker_login("operator")
    presence = "cloudlet/v1/nodes/downtown/presence"
    events: list[Any] = []

    async def scenario(port: int, dana: tuple[str, str]) -> None:
        async def the_cloudlet() -> None:
            try:
                async with aiomqtt.Client("127.0.0.1", port, identifier="cloudlet-downtown",
                                          username=node[0], password=node[1],
                                          will=aiomqtt.Will(presence, b"offline-will", qos=1,
                                                            retain=True)) as c:
                    await c.subscribe("cloudlet/v1/nodes/downtown/commands", qos=1)
                    events.append("cloudlet connected")
                    async for _ in c.messages:
                        pass
            except aiomqtt.MqttError:
                events.append("cloudlet kicked off")

        async def operator_watch() -> None:
            async with aiomqtt.Client("127.0.0.1", port, identifier="watch",
                                      username=operator[0], password=operator[1]) as c:
                await c.subscribe(presence, qos=1)
                try:
                    async with asyncio.timeout(3.0):
                        async for m in c.messages:
                            events.append(("presence", bytes(m.payload)))
                except TimeoutError:
                    pass

        cloudlet = asyncio.create_task(the_cloudlet())
        watch = asyncio.create_task(operator_watch())
        await asyncio.sleep(0.5)
        async with aiomqtt.Client("127.0.0.1", port, identifier="cloudlet-downtown",
                                  username=dana[0], password=dana[1]):
            await asyncio.sleep(0.5)
        await watch
        cloudlet.cancel()

    with generated_mosquitto(metro, tmp_path) as broker:
        asyncio.run(scenario(broker.port, ("dana", broker.client_passwords["dana"])))
    assert "cloudlet connected" in events and "cloudlet kicked off" not in events, events
    assert ("presence", b"offline-will") not in events, events


def test_f7_a_client_parks_nothing_in_the_embedded_broker(metro: Metro) -> None:
    """F7 (low-medium; any client). A client could publish *retained* messages of any
    size under its own `clients/NAME/`, and the embedded broker kept each in memory
    after the client left (measured: 20 x 10 MiB grew `cloudlet up` by ~225 MB, for
    good). Now a client's messages are not retained, and are at most 64 KiB."""
    import aiomqtt

    host, port = metro.broker_url.removeprefix("mqtt://").split(":")
    token = metro.token("hoarder")
    topics = [f"cloudlet/v1/clients/hoarder/junk/{i}" for i in range(3)]
    small = "cloudlet/v1/clients/hoarder/small"

    async def scenario() -> tuple[list[int], list[int]]:
        live: list[int] = []
        async with aiomqtt.Client(host, int(port), username="hoarder", password=token,
                                  timeout=60) as c:
            await c.subscribe("cloudlet/v1/clients/hoarder/#", qos=1)
            for t in topics:
                await c.publish(t, b"\0" * (8 << 20), qos=1, retain=True)
            await c.publish(small, b"report", qos=1, retain=True)
            with contextlib.suppress(TimeoutError):  # live delivery: the small one only
                async with asyncio.timeout(3):
                    async for m in c.messages:
                        live.append(len(m.payload))
        kept: list[int] = []
        async with aiomqtt.Client(host, int(port), username="hoarder", password=token,
                                  timeout=60) as c:
            await c.subscribe("cloudlet/v1/clients/hoarder/#", qos=1)
            with contextlib.suppress(TimeoutError):  # what the broker kept: nothing
                async with asyncio.timeout(2):
                    async for m in c.messages:
                        kept.append(len(m.payload))
        return live, kept

    live, kept = asyncio.run(scenario())
    assert live == [len(b"report")] and kept == [], (live, kept)



def test_held_the_embedded_brokers_topic_rules(metro: Metro) -> None:
    """A client's subscriptions to wildcards, `$SYS`, `$share`, other clients and
    telemetry are refused; its publishes and Wills outside `clients/NAME/` reach no
    one; a client token is no password for a node or the operator."""
    import aiomqtt

    alice = metro.token("alice")
    forbidden = ["#", "$SYS/#", "cloudlet/v1/+/+/+", "$share/g/cloudlet/v1/#",
                 "$share/g/cloudlet/v1/nodes/+/commands", "cloudlet/v1/clients/bob/#",
                 "cloudlet/v1/clients/+/rtt", "+/v1/nodes/+/presence",
                 "cloudlet/v1/nodes/+/#", "cloudlet/v1/vms/#"]
    granted, _ = asyncio.run(mqtt(metro.broker_url, login=("alice", alice),
                                  subscribe=forbidden))
    assert all(code >= 0x80 for code in granted), dict(zip(forbidden, granted, strict=False))

    async def publish_and_watch() -> list[tuple[str, bytes]]:
        async with asyncio.TaskGroup() as tg:
            subscribed = asyncio.Event()
            watch = tg.create_task(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                                        subscribe=["cloudlet/v1/#"], listen_s=2.0,
                                        subscribed=subscribed))
            await subscribed.wait()
            for topic, retain in (("cloudlet/v1/clients/bob/rtt", True),
                                  ("cloudlet/v1/nodes/harbor/commands", False),
                                  ("cloudlet/v1/vms/x/location", True),
                                  ("cloudlet/v1/orchestrator/r/lease", True)):
                await mqtt(metro.broker_url, login=("alice", alice),
                           publish=[(topic, b"alice", retain)])
        return [(t, p) for t, p in watch.result()[1] if p == b"alice"]

    assert asyncio.run(publish_and_watch()) == []
    host, port = metro.broker_url.removeprefix("mqtt://").split(":")
    for user, will_topic in (("alice", "cloudlet/v1/clients/bob/rtt"),
                             ("node.harbor", None), ("operator", None)):
        async def connect(user: str = user, will_topic: str | None = will_topic) -> None:
            will = aiomqtt.Will(will_topic, b"w", retain=True) if will_topic else None
            async with aiomqtt.Client(host, int(port), username=user, password=alice,
                                      will=will):
                pass
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(connect())


def ping(metro: Metro, node: str, wait_s: float = 3.0) -> dict[str, Any] | None:
    """An operator's signed ping to `node`; its event, or None if none came."""
    operator = operator_identity(load_authority(metro.state))
    order = seal(operator, commands_topic(node),
                 command_message("ping", command_id=f"ping-{time.time_ns()}", epoch=0))

    async def go() -> dict[str, Any] | None:
        async with asyncio.TaskGroup() as tg:
            subscribed = asyncio.Event()
            watch = tg.create_task(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                                        subscribe=[events_topic(node)], listen_s=wait_s,
                                        subscribed=subscribed))
            await subscribed.wait()
            await mqtt(metro.broker_url, login=metro.broker_login("operator"),
                       publish=[(commands_topic(node), order, False)])
        events = [sealed_body(raw) for _, raw in watch.result()[1]]
        return next((e for e in events if e.get("op") == "ping"), None)

    return asyncio.run(go())


def test_f6_a_refused_connect_with_a_cloudlets_client_id_changes_nothing(
        metro: Metro) -> None:
    """F6 (high: no credentials at all). amqtt handled a CONNECT with clean_session by
    deleting the existing session of that client id (with all its subscriptions)
    *before* it authenticated the newcomer, and cloudlet client ids are predictable
    (`cloudlet-NAME`): one anonymous CONNECT, refused as it should be, made that
    cloudlet deaf to every order, silently. Now a connection is authenticated before
    anything else happens, and admitted sessions live under their username: neither
    an outsider nor another user reaches a cloudlet's session."""
    victim = "campus"
    assert ping(metro, victim) is not None  # it hears orders

    async def knock() -> None:
        host, port = metro.broker_url.removeprefix("mqtt://").split(":")
        import aiomqtt
        with pytest.raises(aiomqtt.MqttError):  # refused: not authorized
            async with aiomqtt.Client(host, int(port), identifier=f"cloudlet-{victim}"):
                pass

    asyncio.run(knock())
    assert ping(metro, victim) is not None  # still hears orders

    async def as_a_client() -> None:  # a client naming the cloudlet's id: its own session
        host, port = metro.broker_url.removeprefix("mqtt://").split(":")
        import aiomqtt
        async with aiomqtt.Client(host, int(port), identifier=f"cloudlet-{victim}",
                                  username="eve", password=metro.token("eve")):
            await asyncio.sleep(0.2)

    asyncio.run(as_a_client())
    assert ping(metro, victim) is not None
    assert ping(metro, "harbor") is not None
