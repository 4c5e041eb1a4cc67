"""The Fleet gate: only POSTs to Fleet endpoints reach the SuperLink, unchanged (headers carry the node's signature)."""

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from fedlens.gate import allowed, make_app


@pytest.mark.parametrize("method, path, ok", [
    ("POST", "/v1/fleet/pull-messages", True),
    ("POST", "/v1/fleet/push-object", True),
    ("GET", "/v1/fleet/pull-messages", False),
    ("POST", "/v1/control/start-run", False),  # run submission: code that runs beside every site's data
    ("POST", "/v1/control/register-node", False),  # a node key registered by whoever reaches the port
    ("POST", "/v1/runtime/push-messages", False),
    ("POST", "/v1/fleet/../control/start-run", False),
    ("POST", "/v1/fleet/pull-messages/../../control/x", False),
    ("POST", "/v1/fleet/", False),
    ("POST", "/health", False),
    ("POST", "/v1/fleet/pull-messages\n", False),  # `$` would have let a trailing newline through
])
def test_only_fleet_endpoints_pass(method, path, ok):
    assert allowed(method, path) is ok


def test_the_gate_forwards_fleet_requests_unchanged_and_refuses_the_rest():
    seen = []

    async def superlink(request: Request) -> Response:
        seen.append((request.method, request.url.path, request.headers.get("x-signature"), await request.body()))
        return Response(b"reply:" + await request.body(), headers={"x-from": "superlink"})

    upstream = Starlette(routes=[Route("/{p:path}", superlink, methods=["GET", "POST"])])
    gate = make_app("http://superlink", ca=None, transport=httpx.ASGITransport(app=upstream))
    with TestClient(gate) as client:
        r = client.post("/v1/fleet/push-messages", content=b"\x00proto", headers={"x-signature": "sig"})
        assert (r.status_code, r.content, r.headers["x-from"]) == (200, b"reply:\x00proto", "superlink")
        for method, path in (("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/pull-messages"),
                             ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/%2e%2e/control/start-run")):
            refused = client.request(method, path)
            assert refused.status_code == 404 and "only Flower's Fleet API" in refused.text
    assert seen == [("POST", "/v1/fleet/push-messages", "sig", b"\x00proto")]  # nothing else reached it


def test_a_body_over_the_limit_is_refused_before_it_reaches_the_superlink(monkeypatch, caplog):
    from fedlens import gate

    seen = []

    async def superlink(request: Request) -> Response:
        seen.append(await request.body())
        return Response(b"ok")

    monkeypatch.setattr(gate, "MAX_BODY", 1000)
    app = gate.make_app("http://superlink", ca=None, transport=httpx.ASGITransport(
        app=Starlette(routes=[Route("/{p:path}", superlink, methods=["POST"])])))
    with TestClient(app) as client, caplog.at_level("WARNING", logger="fedlens.gate"):
        assert client.post("/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
        assert client.post("/v1/fleet/push-object", content=b"x" * 1000).status_code == 200
        assert client.post("/v1/control/start-run", content=b"").status_code == 404
    assert seen == [b"x" * 1000]
    assert "gate: refused POST /v1/control/start-run from" in caplog.text  # who knocked stays on record
