"""docs/openapi.yaml against the code, without a daemon: every route lists what it
can answer.

What a route can answer is traced from edge_agent/app.py (and the parsers it
calls, edge_agent/requests.py): the middlewares give
every route `413` and `500`, every route but `/health` `401`, and `408` to those
that wait for something; the handler's own raises and the helpers it calls give
the rest. `RAISES` says, for each helper a handler may call, which errors it can
raise (read from the helper and what it calls); a handler that starts calling a
helper, or raising an error, that its route does not document fails here. The
statuses come from `app.STATUS`, so moving an error to another status moves the
spec's duty with it. docs/daemon.md's table of statuses by code is checked
against the same source.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from cloudlet import errors
from edge_agent import app
from edge_agent.config import FIELDS
from tests.conftest import ROOT

E = errors
# What each helper a handler calls can raise, read from its code (and what it calls
# in turn). The key is matched in the handler's source.
RAISES: dict[str, list[type[errors.CloudletError]]] = {
    # auth and lookups
    "hosted_vm(": [E.VMNotFound, E.Forbidden, E.VMMoved],  # VMHost.get, _raise_gone
    # the VM here, or on its way by live migration (a held stream: Arrivals.hold)
    "hosted_or_arrived(": [E.VMNotFound, E.Forbidden, E.VMMoved, E.QuotaExceeded,
                           E.CapacityExceeded],
    "peer_only(": [E.Forbidden],
    # bodies, queries (edge_agent/requests.py)
    "unpack_map(": [E.MalformedRequest],
    "parse_create(": [E.MalformedRequest],
    "parse_move(": [E.MalformedRequest],
    "parse_counted(": [E.MalformedRequest, E.RequestTooLarge],
    "parse_challenge(": [E.MalformedRequest],
    "source_endpoint(": [E.MalformedRequest],
    "read_body(": [E.RequestTooLarge],  # the route's BodyLimit (images: ImageTooLarge)
    "spooled_body(": [E.RequestTooLarge, E.StorageFull],  # synthesis: QuotaExceeded too
    "synthesis_limit": [E.QuotaExceeded, E.CapacityExceeded],
    "open_websocket(": [E.MalformedRequest],
    # VMHost
    ".add_image(": [E.ImageTooLarge, E.ImageRejected, E.QuotaExceeded, E.StorageFull,
                    E.ShuttingDown],
    ".delete_image(": [E.ImageInUse, E.ImageNotFound, E.StorageFull, E.ShuttingDown],
    ".create(": [E.BadCall, E.InvalidArgument, E.ImageNotFound, E.ImageRejected, E.VMTrapped,
                 E.VMOutOfFuel, E.VMDeadlineExceeded, E.QuotaExceeded, E.CapacityExceeded,
                 E.StorageFull, E.ShuttingDown],
    "apply_call(": [E.MalformedRequest, E.RequestTooLarge, E.BadCall, E.VMTrapped,
                    E.VMOutOfFuel, E.VMMemoryLimit, E.VMFailed, E.SequenceGap,
                    E.SequenceConflict, E.ReplyExpired, E.VMMoved, E.ShuttingDown,
                    E.CloudletError],  # _fail: a non-Cloudlet error inside a call
    ".snapshot_bytes(": [E.VMMoved, E.ShuttingDown],
    ".destroy(": [E.ShuttingDown],
    ".adopt_snapshot(": [E.SnapshotCorrupt, E.SnapshotTooLarge, E.SnapshotVersionUnsupported,
                         E.SnapshotImageMismatch, E.BadCall, E.ImageNotFound, E.VMMemoryLimit,
                         E.QuotaExceeded, E.CapacityExceeded, E.StorageFull, E.ShuttingDown],
    # moves (Mover)
    "mover.resolve(": [E.Forbidden, E.BadCall],
    "mover.move(": [E.BadCall, E.Forbidden, E.TrustError, E.PeerUnverified,
                    E.MigrationAborted, E.MigrationTimeout, E.MigrationChannelLost],
    ".committed(": [],
}
MIDDLEWARE_ERRORS = ("401", "413", "500")
ERROR_MEDIA = ("application/msgpack", "application/json")


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    return spec


SPEC = load_spec()


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def routes() -> list[tuple[str, str, Callable[..., Any]]]:
    """(method, path, handler) of every route `build_app` adds."""
    source = inspect.getsource(app.build_app)
    found = re.findall(r'add_(get|post|delete)\("([^"]+)", (\w+)\)', source)
    assert len(found) == source.count("app.router.add_"), "a route this test cannot read"
    return [(method, path, getattr(app, handler)) for method, path, handler in found]


ROUTES = routes()
IDS = [f"{m.upper()} {p}" for m, p, _ in ROUTES]


def operation(method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = SPEC["paths"][path][method]
    return op


def handler_source(handler: Callable[..., Any]) -> str:
    return inspect.getsource(handler)


def traced_errors(handler: Callable[..., Any]) -> set[type[errors.CloudletError]]:
    """What the handler can raise: its own `raise errors.X`, and what the helpers
    it calls raise (`RAISES`)."""
    source = handler_source(handler)
    if "open_websocket(" in source:  # past the upgrade, errors are stream messages
        source = source.split("open_websocket(", 1)[0] + "open_websocket("
    found = {getattr(errors, name) for name in re.findall(r"(?<![\w.])errors\.(\w+)\(", source)}
    for helper, raised in RAISES.items():
        if helper in source:
            found.update(raised)
    if "body_limit(" in source and "synthesize" in handler.__name__:
        found.update(RAISES["synthesis_limit"])
    return found


def waits(handler: Callable[..., Any]) -> bool:
    """Can the deadline middleware time this route out? Only if its handler awaits
    something, and it is not a WebSocket route (exempt once upgraded; a plain
    request is refused before anything waits)."""
    source = handler_source(handler)
    return "await " in source and "open_websocket(" not in source


def test_every_helper_in_the_trace_is_called_by_some_handler() -> None:
    sources = [handler_source(h) for _, _, h in ROUTES] + [inspect.getsource(app.body_limit)]
    for helper in RAISES:
        assert any(helper in s for s in sources), f"RAISES has a stale entry {helper!r}"


def test_every_route_is_documented_and_nothing_else() -> None:
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops if m != "parameters"}
    assert documented == {(m, p) for m, p, _ in ROUTES}


@pytest.mark.parametrize(("method", "path", "handler"), ROUTES, ids=IDS)
def test_each_route_documents_what_its_code_can_answer(
        method: str, path: str, handler: Callable[..., Any]) -> None:
    responses = operation(method, path)["responses"]
    public = path in app.PUBLIC_PATHS
    needed = {s for s in MIDDLEWARE_ERRORS if not (public and s == "401")}
    for exc in traced_errors(handler):
        needed.add(str(app.status_of(exc("traced"))))
    missing = needed - set(responses)
    assert not missing, f"{method.upper()} {path} can answer {sorted(missing)}"
    assert ("401" in responses) != public
    assert ("408" in responses) == waits(handler), "408 iff the route waits"


@pytest.mark.parametrize(("method", "path", "handler"), ROUTES, ids=IDS)
def test_each_route_says_who_may_ask(method: str, path: str,
                                     handler: Callable[..., Any]) -> None:
    security = operation(method, path).get("security", SPEC["security"])
    schemes = {name for requirement in security for name in requirement}
    if path in app.PUBLIC_PATHS:
        assert security == []
    elif path.startswith("/v1/peer/"):
        assert schemes == {"peerToken"}
        assert "peer_only(" in handler_source(handler)
    else:
        assert schemes == {"clientToken", "peerToken"}
    assert schemes <= set(SPEC["components"]["securitySchemes"])


@pytest.mark.parametrize(("method", "path", "handler"), ROUTES, ids=IDS)
def test_every_error_status_answers_an_error_map(method: str, path: str,
                                                  handler: Callable[..., Any]) -> None:
    for status, response in operation(method, path)["responses"].items():
        if int(status) < 400:
            continue
        content = resolve(response)["content"]
        assert set(content) == set(ERROR_MEDIA), (status, set(content))
        for media in ERROR_MEDIA:
            assert content[media]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_each_error_response_names_codes_of_its_status() -> None:
    """The codes a shared error response lists are answered with that very status,
    wherever the response is used."""
    used: dict[str, set[str]] = {}
    for ops in SPEC["paths"].values():
        for method, op in ops.items():
            if method == "parameters":
                continue
            for status, response in op.get("responses", {}).items():
                if "$ref" in response:
                    used.setdefault(response["$ref"].rsplit("/", 1)[1], set()).add(status)
    for name, response in SPEC["components"]["responses"].items():
        assert len(used.get(name, ())) == 1, f"{name} is used at {used.get(name)}"
        (status,) = used[name]
        for code in response["x-error-codes"]:
            assert status_of_code(code) == int(status), (name, code)


def status_of_code(code: str) -> int:
    if code == "internal_error":  # not a class: the error middleware's own answer
        return 500
    exc = errors.error_for_code(code, "")
    assert exc.code == code, f"no error class has code {code!r}"
    return app.status_of(exc)


def test_every_traced_error_code_is_listed_in_the_spec_and_in_daemon_md() -> None:
    listed = {code for r in SPEC["components"]["responses"].values()
              for code in r["x-error-codes"]}
    table = daemon_md_table()
    for _, _, handler in ROUTES:
        for exc in traced_errors(handler):
            assert exc.code in listed, f"{exc.code} is in no error response of the spec"
    for code in listed:
        assert code in table, f"docs/daemon.md's table lacks {code}"
        assert table[code] == status_of_code(code), code


def daemon_md_table() -> dict[str, int]:
    """docs/daemon.md's table of statuses by code: code -> status."""
    doc = (ROOT / "docs" / "daemon.md").read_text()
    section = doc.split("## Data plane (HTTP)", 1)[1]
    table: dict[str, int] = {}
    for status, codes in re.findall(r"^\| (\d{3}) \| (.+) \|$", section, flags=re.M):
        for code in re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", codes)):
            table[code] = int(status)
    return table


def test_daemon_md_table_agrees_with_the_app() -> None:
    table = daemon_md_table()
    assert table, "no table found"
    for code, status in table.items():
        assert status_of_code(code) == status, (code, status)


def test_request_bodies_say_their_cap() -> None:
    """Every body names the setting that caps it; a route whose cap is not the
    default `max_request_kib` is one `body_limit` treats apart, and the reverse."""
    special = set(re.findall(r'route == "([^"]+)"', inspect.getsource(app.body_limit)))
    for method, path, _ in ROUTES:
        body = operation(method, path).get("requestBody")
        if body is None:
            continue
        cap = body["x-body-cap"]
        assert cap["setting"] in FIELDS
        assert (cap["setting"] != "max_request_kib") == (path in special), path
        assert cap["refused"] in {"request_too_large", "image_too_large"}
