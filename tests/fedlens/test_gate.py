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


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _signed(key, at=None) -> dict[str, str]:
    """The headers Flower's SuperNode sends (NodeAuthHttpInterceptor), signed with Flower's own primitives."""
    import base64
    import datetime

    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    stamp = (at or datetime.datetime.now(datetime.UTC)).isoformat()
    return {"flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
            "flwr-timestamp": stamp, "flwr-signature": base64.b64encode(sign_message(key, stamp.encode())).decode()}


def _registry(path, **keys) -> None:
    from cryptography.hazmat.primitives import serialization

    from server.identity import registry_text

    path.write_text(registry_text({site: k.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() for site, k in keys.items()}))


def test_with_the_registry_only_requests_signed_by_a_registered_site_are_read(tmp_path):
    import datetime
    import os

    site, stranger = _key(), _key()
    _registry(tmp_path / "registry.toml", a=site)
    seen = []

    async def superlink(request: Request) -> Response:
        seen.append(await request.body())
        return Response(b"ok")

    upstream = Starlette(routes=[Route("/{p:path}", superlink, methods=["POST"])])
    gate = make_app("http://superlink", ca=None, registry=tmp_path / "registry.toml",
                    transport=httpx.ASGITransport(app=upstream))
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=400)
    forged = {**_signed(site), "flwr-signature": _signed(stranger)["flwr-signature"]}
    with TestClient(gate) as client:
        assert client.post("/v1/fleet/pull-messages", content=b"mine", headers=_signed(site)).status_code == 200
        for headers, why in (({}, "no flwr-public-key header"),
                             (_signed(stranger), "a key that is not in the site registry"),
                             (_signed(site, at=old), "a signature timestamped 400 s ago"),
                             (forged, "a signature that does not verify"),
                             ({**_signed(site), "flwr-public-key": "%%%"}, "unreadable node-authentication headers")):
            r = client.post("/v1/fleet/pull-messages", content=b"theirs", headers=headers)
            assert (r.status_code, why in r.text) == (401, True), (why, r.text)
        # A site added to the registry is let in without restarting the gate.
        _registry(tmp_path / "registry.toml", a=site, b=stranger)
        os.utime(tmp_path / "registry.toml", ns=(1, 2))  # a new stamp, whatever the clock's resolution
        assert client.post("/v1/fleet/pull-messages", content=b"new", headers=_signed(stranger)).status_code == 200
        (tmp_path / "registry.toml").unlink()
        r = client.post("/v1/fleet/pull-messages", content=b"x", headers=_signed(site))
        assert r.status_code == 503 and "site registry cannot be read" in r.text
    assert seen == [b"mine", b"new"]  # nothing unsigned, stale, forged or unregistered reached the SuperLink
