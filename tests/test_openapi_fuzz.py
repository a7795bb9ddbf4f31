"""docs/openapi.yaml against a real daemon: schemathesis sends what the spec allows
(and what it forbids), and every answer must be one the spec lists.

One `cloudlet agent` process; every operation of the spec gets its examples, the
coverage phase's edge cases (each documented constraint and its violations) and a
bounded number of generated requests. Checked on every answer:

- no `500 internal_error`, ever (a documented status, but always a bug);
- the status is documented for the route (`status_code_conformance`), other 5xx
  included: `502`, `503` and `507` are answers with a meaning, not crashes;
- the content type is documented, and the body matches its schema, for JSON and
  msgpack answers alike (msgpack is decoded by a registered deserializer);
- a request the spec forbids is refused with a 4xx (`negative_data_rejection`);
- a route that needs a token refuses a request without one or with a wrong one
  (`ignored_auth`);
- and schemathesis's other default checks (methods the spec does not list get a
  405, a deleted resource stays deleted, ...).

Bodies are msgpack: a serializer registered for `application/msgpack` packs what
schemathesis generates. About half of the requests are steered to things that
exist (path ids, the image of a new VM, a real image or overlay as the body of an
upload or a synthesis), so the routes behind the lookups and parsers are reached
too; the rest keep what was generated. VMs that requests create are destroyed
again, so that the client's quotas leave room for more. The run is seeded so that CI is repeatable,
and bounded per operation; a deeper hunt by hand: CLOUDLET_FUZZ_SEED=N
CLOUDLET_FUZZ_EXAMPLES=500 (and CLOUDLET_FUZZ_STATS=1 with `-s` for what it reached).
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, reject, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.transport.serialization import Binary

from cloudlet.vm import VM, ImageStore, VMLimits
from tests.conftest import ROOT, WORKLOADS
from tests.daemons import Daemon, make_daemon

SPEC = ROOT / "docs" / "openapi.yaml"
MSGPACK = "application/msgpack"
KV = (WORKLOADS / "kvstore.wasm").read_bytes()
SEED = int(os.environ.get("CLOUDLET_FUZZ_SEED", "20250601"))
# Per operation: enough generated requests to pass every branch of its checks
# (schemathesis also sends its examples and the coverage phase's edge cases), few
# enough that the whole run stays within seconds on 2 shared cores.
MAX_EXAMPLES = int(os.environ.get("CLOUDLET_FUZZ_EXAMPLES", "20"))
REQUEST_TIMEOUT_S = 20.0  # past the daemon's own 10 s deadline: a hang is ours to see
EXAMPLE_DEADLINE_MS = 30_000  # hypothesis's bound on one example (two requests at most)
# Each operation's test (about a second each here): one that hangs fails, not CI.
# Starts a daemon: not in the fast subset (-m 'not slow').
pytestmark = [pytest.mark.timeout(int(os.environ.get("CLOUDLET_FUZZ_TIMEOUT_S", "120"))),
              pytest.mark.slow]


def _plain(value: Any) -> Any:
    """What schemathesis generated, as msgpack takes it (`format: binary` is bin)."""
    if isinstance(value, Binary):
        return value.data
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _packable(value: Any) -> bool:
    """msgpack integers are 64-bit: a larger one is no request anyone can send."""
    if isinstance(value, dict):
        return all(_packable(v) for v in value.values())
    if isinstance(value, list):
        return all(_packable(v) for v in value)
    return not isinstance(value, int) or -(1 << 63) <= value < (1 << 64)


def _jsonable(value: Any) -> Any:
    """A decoded msgpack answer in JSON's terms, for schema validation: bin becomes
    a string (the spec's `format: binary`)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@schemathesis.serializer(MSGPACK)
def _pack(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    packed: bytes = msgpack.packb(_plain(value))
    return packed


schemathesis.serializer.alias("application/wasm", "application/octet-stream")


@schemathesis.deserializer(MSGPACK)
def _unpack(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    return _jsonable(msgpack.unpackb(response.content))


@schemathesis.check  # registered: it runs with the built-in checks on every answer
def no_internal_error(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                      case: schemathesis.Case) -> bool | None:
    """A 500 is documented (any route can have a bug) but never acceptable."""
    if response.status_code == 500:
        raise AssertionError(f"500 from {case.operation.label}: {response.content[:300]!r}")
    return None


CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    "checks": {
        "not_a_server_error": {"enabled": False},  # no_internal_error, and the statuses
        "positive_data_acceptance": {"enabled": False},  # a valid map may name no image
    },
    "operations": [{
        # aiohttp's 405 lists the methods of every route the path matches, and
        # /v1/vms/synthesize also matches /v1/vms/{vm} (GET, DELETE): a VM named
        # "synthesize", which cannot exist (VM ids are hex).
        "include-path": "/v1/vms/synthesize",
        "checks": {"allow_header_conformance": {"enabled": False}},
    }],
})
schema = schemathesis.openapi.from_path(SPEC, config=CONFIG)


@dataclass
class World:
    """A daemon with things in it that requests may name."""

    daemon: Daemon
    client_token: str
    overlay: bytes  # a snapshot of a kvstore VM run here, in this process
    digest: str = ""
    vm: str = ""
    # (operation, status) -> answers: what the run reached (CLOUDLET_FUZZ_STATS=1 prints it)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)

    def ensure(self) -> None:
        """The image and a VM of it exist (a fuzzed DELETE may have removed them)."""
        d, token = self.daemon, self.client_token
        if self.vm and d.request("GET", f"/v1/vms/{self.vm}", token=token)[0] == 200:
            return
        status, body = d.request("POST", "/v1/images", raw=KV, token=token)
        assert status == 201, body
        self.digest = body["digest"]
        status, body = d.request("POST", "/v1/vms", {"image": self.digest}, token=token)
        if status == 429:  # fuzzed creates took the client's quota: make room
            for vm in d.request("GET", "/v1/vms", token=token)[1]["vms"]:
                d.request("DELETE", f"/v1/vms/{vm['vm']}", token=token)
            status, body = d.request("POST", "/v1/vms", {"image": self.digest}, token=token)
        assert status == 201, body
        self.vm = body["vm"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    # Few VMs per client: a fuzzed create that succeeds boots a VM, and quotas are
    # part of what is exercised.
    d = make_daemon(tmp, "fuzz", client_max_vms=8).start()
    try:
        local = VM.create(ImageStore(tmp / "store").add(KV), VMLimits(memory_bytes=16 << 20))
        local.call("kv_put", 1, 42)
        w = World(d, d.token("fuzzer"), local.snapshot().to_bytes())
        local.close()
        w.ensure()
        yield w
        if os.environ.get("CLOUDLET_FUZZ_STATS"):
            for (label, status), n in sorted(w.answers.items()):
                print(f"{n:5d}  {status}  {label}")
            print(f"{sum(w.answers.values()):5d}  requests")
        log = d.log()
        assert d.stop() == 0, log
        assert "internal error" not in d.log_path.read_text(), log
    finally:
        d.kill()


def _steer(case: schemathesis.Case, what: str) -> bool:
    """About half of the cases get `what` replaced by something real: which ones
    depends on the case alone, so a seeded run is the same run."""
    key = f"{case.operation.label}|{what}|{case.path_parameters}|{case.body!r:.200}"
    return zlib.crc32(key.encode(errors="replace")) % 2 == 0


@schema.parametrize()
@settings(deadline=EXAMPLE_DEADLINE_MS, suppress_health_check=list(HealthCheck))
def test_the_daemon_answers_as_its_openapi_says(case: schemathesis.Case, world: World) -> None:
    path_params = case.path_parameters or {}
    for name in ("vm", "digest"):
        if isinstance(path_params.get(name), str) and _steer(case, name):
            world.ensure()
            path_params[name] = getattr(world, name)
    if (isinstance(case.body, dict) and isinstance(case.body.get("image"), str)
            and _steer(case, "image")):
        world.ensure()
        case.body["image"] = world.digest
    real_body = {"POST /v1/images": KV, "POST /v1/vms/synthesize": world.overlay,
                 "POST /v1/peer/vms": world.overlay}.get(case.operation.label)
    meta = case.meta
    negative = {loc for loc, info in (meta.components if meta else {}).items()
                if info.mode.is_negative}
    sent: dict[str, Any] = {}
    if real_body is not None and not negative and _steer(case, "body"):
        sent["data"] = real_body  # sent instead of the generated body (schemathesis knows)
    if case.media_type == MSGPACK and not _packable(case.body):
        reject()
    peer = case.path.startswith("/v1/peer/")
    token = world.daemon.peer_token() if peer else world.client_token
    # A case whose headers are the point (no token, a wrong one) keeps its own.
    headers = {} if ParameterLocation.HEADER in negative else {
        "Authorization": f"Bearer {token}"}
    if _steer(case, "accept"):
        headers["Accept"] = "application/json"
    response = case.call_and_validate(base_url=world.daemon.endpoint, headers=headers,
                                      timeout=REQUEST_TIMEOUT_S, **sent)
    world.answers[case.operation.label, response.status_code] += 1
    if response.status_code == 201 and case.method == "POST" and "/vms" in case.path:
        # A new VM: destroyed again, so the quotas keep room for the next ones.
        vm = _decoded(response)["vm"]
        status, body = world.daemon.request("DELETE", f"/v1/vms/{vm}", token=token)
        assert status == 204, body


def _decoded(response: schemathesis.Response) -> Any:
    if "json" in response.headers.get("content-type", [""])[0]:
        return json.loads(response.content)
    return msgpack.unpackb(response.content)
