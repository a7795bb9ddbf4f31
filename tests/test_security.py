"""Attacks on a plain `cloudlet up`, each with real processes, each refused.

A real metro (the embedded broker and three cloudlet processes) runs for the
module; an "outside" HTTP server, not part of the cluster, records every
request that reaches it. Each test is an attack that used to work: an outsider
on the broker giving orders, forged retained presences and locations, a
client-chosen destination, a peer credential replayed elsewhere, a deposed
leader's orders. After each, the VMs are where they were and the outside
server saw no credential and no state.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from cloudlet.errors import PeerUnverified
from cloudlet.protocol import (
    Location,
    command_message,
    commands_topic,
    events_topic,
    location_message,
    location_topic,
    presence_message,
    presence_topic,
)
from cloudlet.trust import peer_tokens
from cloudlet.trust.cluster import (
    load_authority,
    operator_identity,
)
from cloudlet.trust.keys import SigningKey
from cloudlet.trust.sealed import Identity, seal
from mobile_client import CloudletClient
from tests.daemons import cloudlet_identity, sealed_body
from tests.metro import (
    KVSTORE,
    Metro,
    Recorder,
    dropped,
    generated_mosquitto,
    http_request,
    mqtt,
    new_vm,
    running_metro,
    serve,
    where_is,
)
from tests.waiting import async_wait_until, wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

# --- an outside server -------------------------------------------------------------------


@pytest.fixture
def outside() -> Iterator[Recorder]:
    """An HTTP server outside the cluster that records every request reaching it."""
    record = Recorder()
    server = serve(record)
    yield record
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metro]:
    with running_metro(tmp_path_factory.mktemp("metro")) as running:
        yield running


# --- the broker admits only the cluster ---------------------------------------------------


def test_an_outsider_cannot_log_in_to_the_broker(metro: Metro) -> None:
    for login in (None, ("node.harbor", "guess"), ("operator", "guess"),
                  ("alice", "not-a-token"), ("alice", metro.token("bob"))):
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(mqtt(metro.broker_url, login=login))


def test_a_client_on_the_broker_reads_and_writes_only_its_own(metro: Metro) -> None:
    alice = metro.token("alice")
    vm = new_vm(metro, "downtown", alice)
    # Alice's token is her broker password: she gets in, but may not read everything,
    # and what she publishes outside clients/alice/ goes nowhere.
    granted, _ = asyncio.run(mqtt(metro.broker_url, login=("alice", alice),
                                  subscribe=["cloudlet/v1/#", f"cloudlet/v1/vms/{vm}/location",
                                             "cloudlet/v1/nodes/+/commands"]))
    assert granted[0] >= 0x80 and granted[1] < 0x80 and granted[2] >= 0x80
    order = seal(operator_identity(load_authority(metro.state)), commands_topic("downtown"),
                 command_message("migrate", command_id="x", epoch=1, vm=vm, to="harbor"))

    async def attack_and_watch() -> list[tuple[str, bytes]]:
        async with asyncio.TaskGroup() as tg:
            subscribed = asyncio.Event()
            watch = tg.create_task(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                                        subscribe=["cloudlet/v1/nodes/downtown/commands"],
                                        listen_s=2.0,
                                        subscribed=subscribed))
            await subscribed.wait()
            # Even a genuine signed order cannot be posted by a client.
            await mqtt(metro.broker_url, login=("alice", alice),
                       publish=[(commands_topic("downtown"), order, False),
                                (presence_topic("harbor"), b"forged", True)])
        return watch.result()[1]

    assert asyncio.run(attack_and_watch()) == []
    time.sleep(1.0)
    assert where_is(metro, vm, alice) == "downtown"
    _, retained = asyncio.run(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                                   subscribe=[presence_topic("harbor")], listen_s=1.0))
    assert retained and all(raw != b"forged" for _, raw in retained)


def test_a_will_on_a_topic_the_user_may_not_write_is_refused(metro: Metro) -> None:
    alice = metro.token("alice")

    async def connect_with_will() -> None:
        will = aiomqtt.Will(presence_topic("harbor"), b"forged offline", qos=1, retain=True)
        async with aiomqtt.Client("127.0.0.1", metro.broker_port, identifier="will-attacker",
                                  username="alice", password=alice, will=will):
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connect_with_will())


# --- nothing is believed because it arrived -------------------------------------------------


def test_forged_and_unauthorized_orders_move_nothing(metro: Metro, outside: Recorder) -> None:
    """An attacker who has a cloudlet's broker login (or a cloudlet key without the
    orchestrator role) orders another cloudlet to migrate a client's VM away: refused
    every way it is tried."""
    alice = metro.token("alice")
    vm = new_vm(metro, "downtown", alice)
    before = dropped(metro, "downtown", alice)
    harbor = metro.node_identity("harbor")
    topic = commands_topic("downtown")
    order = command_message("migrate", command_id="evil", epoch=10**9, vm=vm, to="harbor")
    impostor = Identity(SigningKey.generate(), harbor.cert)  # harbor's certificate, not key
    plain_cloudlet = cloudlet_identity(metro.state, "harbor")  # role cloudlet only
    attacks = [
        msgpack.packb({"v": 2, **order}),  # unsigned, as before this change
        seal(impostor, topic, order),  # forged signature
        seal(plain_cloudlet, topic, order),  # a real cloudlet, but not an orchestrator
        seal(harbor, commands_topic("campus"), order),  # signed for another topic
        seal(operator_identity(load_authority(metro.state)), topic, order,
             clock=lambda: time.time() - 3600),  # genuine, but an hour old
    ]
    asyncio.run(mqtt(metro.broker_url, login=metro.broker_login("node.harbor"),
                     publish=[(topic, raw, False) for raw in attacks]))
    assert wait_until(lambda: sum(dropped(metro, "downtown", alice).values())
                      >= sum(before.values()) + len(attacks))
    after = dropped(metro, "downtown", alice)
    for reason in ("unsigned", "bad_signature", "wrong_signer", "stale"):
        assert after.get(reason, 0) > before.get(reason, 0), (reason, after)
    assert where_is(metro, vm, alice) == "downtown"
    assert outside.requests == []


def test_a_replayed_order_is_carried_out_once(metro: Metro) -> None:
    operator = operator_identity(load_authority(metro.state))
    order = seal(operator, commands_topic("campus"),
                 command_message("ping", command_id="once", epoch=1))
    _, events = asyncio.run(mqtt_with_events(metro, "campus", [order, order, order]))
    assert [e["id"] for e in events] == ["once"]


async def mqtt_with_events(metro: Metro, node: str,
                           orders: list[bytes]) -> tuple[None, list[dict[str, Any]]]:
    async with asyncio.TaskGroup() as tg:
        subscribed = asyncio.Event()
        watch = tg.create_task(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                                    subscribe=[events_topic(node)], listen_s=3.0,
                                    subscribed=subscribed))
        await subscribed.wait()
        await mqtt(metro.broker_url, login=metro.broker_login("operator"),
                   publish=[(commands_topic(node), raw, False) for raw in orders])
    events = [sealed_body(raw) for _, raw in watch.result()[1]]
    return None, [e for e in events if e.get("op") in ("ping", "migrate")]


def test_a_deposed_epoch_is_refused_even_after_a_restart(metro: Metro) -> None:
    operator = operator_identity(load_authority(metro.state))
    topic = commands_topic("harbor")

    def order(cid: str, epoch: int) -> bytes:
        return seal(operator, topic, command_message("ping", command_id=cid, epoch=epoch))

    _, events = asyncio.run(mqtt_with_events(metro, "harbor", [order("new", 7),
                                                               order("old", 6)]))
    by_id = {e["id"]: e for e in events}
    assert by_id["new"]["ok"] and by_id["new"]["epoch"] == 7
    assert not by_id["old"]["ok"] and by_id["old"]["error"]["code"] == "stale_epoch"
    assert json.loads((metro.state / "nodes" / "harbor" / "epoch.json").read_text()) == {
        "epoch": 7}


def test_a_forged_presence_redirects_no_move(metro: Metro, outside: Recorder) -> None:
    """A retained presence for harbor naming the outside server, unsigned or signed by
    another cloudlet, is not believed: the owner's move still goes to the real harbor."""
    alice = metro.token("alice")
    vm = new_vm(metro, "downtown", alice)
    fake = presence_message("harbor", outside.endpoint, session="forged", position_m=(0, 0),
                            zone="", capacity={}, vms=0, refresh_s=30.0)
    topic = presence_topic("harbor")
    downtown = metro.node_identity("downtown")
    impostor = Identity(SigningKey.generate(), metro.node_identity("harbor").cert)
    for forged in (msgpack.packb(fake), seal(downtown, topic, fake), seal(impostor, topic, fake)):
        asyncio.run(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                         publish=[(topic, forged, True)]))
    time.sleep(1.0)
    status, body = metro.request("downtown", "POST", f"/v1/vms/{vm}/migrate", {"to": "harbor"},
                                 token=alice)
    assert status == 200, body
    assert body["endpoint"] == metro.endpoints["harbor"]
    assert where_is(metro, vm, alice) == "harbor"
    assert outside.requests == []
    # The genuine harbor publishes its presence again within its refresh; restore it now
    # for the tests that follow, as harbor would.
    restore_presence(metro, "harbor")


def restore_presence(metro: Metro, node: str) -> None:
    me = metro.node_identity(node)
    genuine = seal(me, presence_topic(node), presence_message(
        node, metro.endpoints[node], session="restored", position_m=(0, 0), zone="",
        capacity={}, vms=0, refresh_s=30.0))
    asyncio.run(mqtt(metro.broker_url, login=metro.broker_login("operator"),
                     publish=[(presence_topic(node), genuine, True)]))


def test_a_forged_location_sends_no_token_anywhere(metro: Metro, outside: Recorder) -> None:
    """A forged retained location of a client's VM, naming the outside server: the SDK
    does not follow it, and its token never reaches that server."""
    token = metro.token("carol")

    async def scenario() -> list[int]:
        results = []
        async with CloudletClient(token, broker=metro.broker_url) as client:
            await client.discovery.wait_for(lambda d: len(d.online()) == 3, 15)
            async with client.session(KVSTORE, keep=True) as s:
                await s.call("kv_put", 1, 7)
                # The SDK watches the VM's location once it has the genuine one.
                assert await async_wait_until(
                    lambda: client.discovery.location_of(s.vm_id) is not None)
                forged = location_message(s.vm_id, Location("harbor", outside.endpoint))
                topic = location_topic(s.vm_id)
                harbor = metro.node_identity("harbor")
                impostor = Identity(SigningKey.generate(), harbor.cert)
                for raw in (msgpack.packb(forged), seal(impostor, topic, forged),
                            seal(metro.node_identity("campus"), topic, forged)):
                    await mqtt(metro.broker_url, login=metro.broker_login("node.harbor"),
                               publish=[(topic, raw, True)])
                assert await async_wait_until(lambda: sum(client.discovery.dropped.values()) >= 3)
                for i in range(20):
                    results.append(await s.call("kv_put", 2, i))
                assert s.stats().moves_followed == 0
                assert client.discovery.dropped.get("wrong_signer", 0) >= 1
                assert client.discovery.dropped.get("bad_signature", 0) >= 1
        return results

    assert len(asyncio.run(scenario())) == 20
    assert outside.requests == []


# --- credentials stay home ---------------------------------------------------------------


def test_a_client_cannot_send_its_vm_to_an_address_of_its_choosing(
        metro: Metro, outside: Recorder) -> None:
    alice = metro.token("alice")
    vm = new_vm(metro, "downtown", alice)
    status, body = metro.request("downtown", "POST", f"/v1/vms/{vm}/migrate",
                                 {"endpoint": outside.endpoint}, token=alice)
    assert (status, body["code"]) == (403, "forbidden")
    status, body = metro.request("downtown", "POST", f"/v1/vms/{vm}/migrate",
                                 {"to": "nowhere"}, token=alice)
    assert status == 400
    assert outside.requests == []
    assert where_is(metro, vm, alice) == "downtown"


def test_an_operator_named_endpoint_must_prove_itself_first(metro: Metro,
                                                            outside: Recorder) -> None:
    """Even the operator's raw endpoint gets nothing before it proves it is a cloudlet:
    the outside server sees one unauthenticated challenge, then nothing."""
    alice = metro.token("alice")
    vm = new_vm(metro, "downtown", alice)
    operator = operator_identity(load_authority(metro.state))
    token = peer_tokens.mint(operator, "downtown")
    status, body = metro.request("downtown", "POST", f"/v1/vms/{vm}/migrate",
                                 {"endpoint": outside.endpoint}, token=token)
    assert (status, body["code"]) == (502, "peer_unverified"), body
    assert [(m, p.split("?")[0]) for m, p, _ in outside.requests] == [("GET", "/health")]
    assert outside.credentials_seen() == []
    assert where_is(metro, vm, alice) == "downtown"


def test_a_peer_credential_opens_only_the_cloudlet_it_is_for(metro: Metro) -> None:
    harbor = metro.node_identity("harbor")
    for_campus = peer_tokens.mint(harbor, "campus")
    assert metro.request("campus", "GET", "/v1/peer/vms", token=for_campus)[0] == 200
    for node in ("downtown", "harbor"):
        status, body = metro.request(node, "GET", "/v1/peer/vms", token=for_campus)
        assert (status, body["code"]) == (401, "unauthorized"), node
    # A client token is no peer credential, and a peer token is not a client's.
    alice = metro.token("alice")
    assert metro.request("campus", "GET", "/v1/peer/vms", token=alice)[0] == 403
    # A cloudlet key that is not the cluster's (its certificate self-made) opens nothing.
    rogue = Identity(SigningKey.generate(), harbor.cert)
    assert metro.request("campus", "GET", "/v1/peer/vms",
                         token=peer_tokens.mint(rogue, "campus"))[0] == 401


# --- an external Mosquitto, configured by `cloudlet broker-config` ---------------------------


def test_mosquitto_with_generated_files_admits_only_the_cluster(
        metro: Metro, tmp_path: Path) -> None:
    with generated_mosquitto(metro, tmp_path) as broker:
        url, dana = broker.url, ("dana", broker.client_passwords["dana"])
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(mqtt(url))  # anonymous
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(mqtt(url, login=("dana", "wrong")))

        async def scenario() -> list[tuple[str, bytes]]:
            # One connection per user: the generated config binds client ids to
            # usernames, so a second connection of a user would replace the first.
            async with asyncio.TaskGroup() as tg:
                subscribed = asyncio.Event()
                watch = tg.create_task(mqtt(url, login=metro.broker_login("node.downtown"),
                                            subscribe=["cloudlet/v1/nodes/downtown/commands"],
                                            listen_s=2.5,
                                            subscribed=subscribed))
                await subscribed.wait()
                spy = tg.create_task(mqtt(
                    url, login=dana, subscribe=["cloudlet/v1/#"],
                    publish=[(commands_topic("downtown"), b"order", False),
                             ("cloudlet/v1/clients/dana/rtt", b"mine", False)],
                    listen_s=1.5))
            # Dana sees her own topic only; downtown got no order from her.
            assert watch.result()[1] == []
            return spy.result()[1]

        assert [t for t, _ in asyncio.run(scenario())] == ["cloudlet/v1/clients/dana/rtt"]


# --- smaller holes ---------------------------------------------------------------------------


def test_the_sdk_sends_no_token_to_an_endpoint_that_is_not_a_cloudlet(
        metro: Metro, outside: Recorder) -> None:
    token = metro.token("erin")

    async def scenario() -> None:
        async with CloudletClient(token, endpoints=[outside.endpoint]) as client:
            with pytest.raises(PeerUnverified):
                async with client.session(KVSTORE):
                    pass
            with pytest.raises(PeerUnverified):
                async with client.attach("0123456789abcdef", outside.endpoint):
                    pass

    asyncio.run(scenario())
    assert outside.requests and outside.credentials_seen() == []
    assert {p.split("?")[0] for _, p, _ in outside.requests} == {"/health"}


def test_token_lifetimes_and_names_are_checked_at_issue(metro: Metro) -> None:
    for args, code in ((["--client", "alice", "--ttl-s", "-10"], "invalid_argument"),
                       (["--client", "alice", "--ttl-s", "0"], "invalid_argument"),
                       (["--client", "node.downtown"], "invalid_argument"),
                       (["--client", "operator"], "invalid_argument"),
                       (["--client", "a/b"], "invalid_argument")):
        out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "token", *args,
                              "--state-dir", str(metro.state)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and f"error [{code}]" in out.stderr, (args, out.stderr)
        assert out.stdout == ""


def test_a_vm_destroyed_while_its_location_goes_out_is_cleared(metro: Metro) -> None:
    """Create and destroy VMs back to back, so destroys land while their location is
    being published: every location ends cleared (none stays in `cloudlet status`)."""
    token = metro.token("frank")
    status, body = http_request(metro.endpoints["campus"], "POST", "/v1/images", token=token,
                                raw=KVSTORE.read_bytes())
    assert status == 201, body
    digest = body["digest"]
    made: list[str] = []

    def churn() -> None:
        for _ in range(25):
            status, body = metro.request("campus", "POST", "/v1/vms", {"image": digest},
                                         token=token)
            assert status == 201, body
            made.append(body["vm"])
            assert metro.request("campus", "DELETE", f"/v1/vms/{body['vm']}",
                                 token=token)[0] == 204

    workers = [threading.Thread(target=churn) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert len(made) == 100
    time.sleep(2.0)  # the last clears go out
    out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "status", "--json", "--broker",
                          metro.broker_url, "--state-dir", str(metro.state), "--wait-s", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = set(json.loads(out.stdout)["vms"])
    assert listed.isdisjoint(made), sorted(listed & set(made))
