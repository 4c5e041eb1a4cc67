"""Deployment, the coordinator's public port: the Fleet gate, which lets the sites' SuperNodes reach Flower's Fleet API
and nothing else.

Flower 1.41 serves three APIs on the SuperLink's one HTTPS port: Fleet (`/v1/fleet/...`: SuperNodes pull
instructions and push replies, each request signed by the node's key), Control (`/v1/control/...`: register node
keys, submit runs, which ships code that runs beside every site's data) and Runtime (`/v1/runtime/...`: the
ServerApp). Its old per-API addresses are gone, so `--host 0.0.0.0` opened all three to whoever reaches the port.
`fedlens link` therefore starts the SuperLink on loopback only and this gate on the public address: it terminates
TLS with the SuperLink's own certificate, forwards `POST /v1/fleet/<endpoint>` to the SuperLink unchanged (node
authentication signs a timestamp in the headers, so it passes through), and answers everything else with 404
without reaching Flower. Operators use the Control API on the coordinator itself (`127.0.0.1:<control port>`).

With the coordinator's site registry (`--registry`, certs/registry.toml from `fedlens certs`) the gate also checks,
from the headers alone and before it reads a byte of the body, that the request is signed by a registered site's
key (Flower's node authentication: the node's public key, a timestamp and the key's signature of it, checked with
Flower's own window): a caller without a registered key is answered 401 and holds no buffer at the gate. The
SuperLink checks the same again, and that the key is the node's. The registry is read again when its file changes.

    python -m fedlens.gate --listen 0.0.0.0:8000 --upstream https://127.0.0.1:9093 --ssl-certfile server.crt \
        --ssl-keyfile server.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import datetime
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("fedlens.gate")

# Fleet endpoints are one lowercase word or words joined by '-': nothing that could climb out of the prefix.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the forwarded request sets anew; a response also loses its
# content-encoding (httpx hands over the decoded body).
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "host", "content-length"}
RESPONSE_DROP = HOP | {"content-encoding", "date", "server"}
REFUSED = "not found: this address serves only Flower's Fleet API (sites); operators use the coordinator itself\n"
# Requests are buffered whole before the SuperLink checks the node's signature, so what an unauthenticated caller can
# hold is MAX_BODY × MAX_CONNECTIONS at most (1 GiB), each for BODY_DEADLINE_S at most.
MAX_BODY = 8 * 2**20  # bytes: Flower sends weights in objects of at most 5 MiB
BODY_DEADLINE_S = 60.0  # to send a whole request body: a caller trickling one is cut off
UPSTREAM_TIMEOUT_S = 120.0  # a Fleet call is one short request; a SuperLink that does not answer in time is a 504
MAX_CONNECTIONS = 128  # open connections the gate serves at once (uvicorn answers 503 beyond)


class SiteKeys:
    """The registered sites' public keys (DER SubjectPublicKeyInfo), read from the registry file and read again
    when it changes."""

    def __init__(self, path: Path) -> None:
        self.path, self.stamp, self.keys = path, None, frozenset()
        self.current()

    def current(self) -> frozenset[bytes]:
        from server.identity import load_registry

        stamp = os.stat(self.path).st_mtime_ns
        if stamp != self.stamp:
            self.keys, self.stamp = frozenset(load_registry(self.path).values()), stamp
            log.info("gate: %d registered site key(s) from %s", len(self.keys), self.path)
        return self.keys


def signed_by_a_site(headers: dict[str, str] | object, keys: frozenset[bytes]) -> str:
    """Why a request's node-authentication headers do not show a registered site's key ("" when they do): Flower's
    own headers, window and signature check (flwr.superlink.routers.fleet.node_auth), against the registry's keys."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import verify_signature

    from server.identity import spki_der

    try:
        pem = base64.b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)  # type: ignore[index]
        signature = base64.b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)  # type: ignore[index]
        stamp = headers[TIMESTAMP_HEADER]  # type: ignore[index]
        key = serialization.load_pem_public_key(pem)
        der = spki_der(key)
        signed_at = datetime.datetime.fromisoformat(stamp)
        age = (datetime.datetime.now(datetime.UTC) - signed_at).total_seconds()
    except KeyError as e:
        return f"no {e.args[0]} header"
    except (ValueError, TypeError, UnicodeError, binascii.Error) as e:
        return f"unreadable node-authentication headers ({type(e).__name__})"
    if der not in keys:
        return "a key that is not in the site registry"
    if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
        return f"a signature timestamped {age:.0f} s ago"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "a key that is not an EC key"
    try:
        if not verify_signature(key, stamp.encode("ascii"), signature):
            return "a signature that does not verify"
    except UnicodeError:
        return "a signature that does not verify"
    return ""


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass the gate: a POST to one Fleet endpoint."""
    return method == "POST" and FLEET_PATH.fullmatch(path) is not None


async def _read(request: Request) -> bytes | None:
    """The request's body, counted as it arrives (a chunked body cannot exceed MAX_BODY either); None beyond it."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(upstream: str, *, ca: str | None, registry: Path | None = None,
             transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The gate as an ASGI app forwarding allowed requests to `upstream` (the SuperLink on loopback; its TLS
    certificate checked against `ca`, None for a plaintext loopback test), signed by a key of `registry` when one is
    given. `transport`: tests put an app there."""
    sites = SiteKeys(registry) if registry is not None else None
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=UPSTREAM_TIMEOUT_S, follow_redirects=False,
                               transport=transport)

    async def forward(request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        if not allowed(request.method, request.url.path):
            # Behind the gate the SuperLink sees every caller as 127.0.0.1: the gate keeps who knocked.
            log.warning("gate: refused %s %s from %s", request.method, request.url.path[:200], peer)
            return PlainTextResponse(REFUSED, status_code=404)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            log.warning("gate: refused a body of %s bytes from %s", declared[:20], peer)
            return PlainTextResponse(f"request body over {MAX_BODY} bytes\n", status_code=413)
        if sites is not None:
            try:
                problem = signed_by_a_site(request.headers, sites.current())
            except (OSError, ValueError) as e:  # the registry file gone or broken: nobody passes until it is fixed
                log.error("gate: the site registry cannot be read: %s", e)
                return PlainTextResponse("the coordinator's site registry cannot be read\n", status_code=503)
            if problem:
                log.warning("gate: refused %s from %s: %s", request.url.path, peer, problem)
                return PlainTextResponse(f"not signed by a registered site: {problem}\n", status_code=401)
        try:
            body = await asyncio.wait_for(_read(request), BODY_DEADLINE_S)
        except TimeoutError:
            log.warning("gate: %s took over %g s to send its request", peer, BODY_DEADLINE_S)
            return PlainTextResponse("request body too slow\n", status_code=408)
        if body is None:
            return PlainTextResponse(f"request body over {MAX_BODY} bytes\n", status_code=413)
        # Headers named in Connection are hop-by-hop too.
        named = {h.strip().lower() for h in request.headers.get("connection", "").split(",")}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP | named]
        try:
            reply = await client.request(request.method, request.url.path, params=request.query_params,
                                         content=body, headers=headers)
        except httpx.TimeoutException:
            return PlainTextResponse("the SuperLink did not answer in time\n", status_code=504)
        except httpx.HTTPError as e:
            return PlainTextResponse(f"the SuperLink did not answer ({type(e).__name__})\n", status_code=502)
        return Response(reply.content, status_code=reply.status_code,
                        headers={k: v for k, v in reply.headers.items() if k.lower() not in RESPONSE_DROP})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE",
                                                                      "HEAD", "OPTIONS"])], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m fedlens.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="host:port the sites dial")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback URL, e.g. https://127.0.0.1:9093")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--ca", help="CA that signed the SuperLink's certificate (checked on the loopback hop)")
    p.add_argument("--registry", type=Path, help="the site registry (certs/registry.toml): only requests signed by "
                   "one of its keys are read and forwarded")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    host, _, port = args.listen.rpartition(":")
    if args.registry is None:
        log.warning("gate: no --registry: request bodies are read before the SuperLink checks who sent them")
    server = uvicorn.Server(uvicorn.Config(make_app(args.upstream, ca=args.ca, registry=args.registry),
                                           host=host.strip("[]"),
                                           port=int(port), ssl_certfile=args.ssl_certfile,
                                           ssl_keyfile=args.ssl_keyfile, log_level="warning", timeout_keep_alive=30,
                                           limit_concurrency=MAX_CONNECTIONS, server_header=False,
                                           date_header=False))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:  # listening: what an operator (and the deployment tests) wait for
            print(f"fedlens gate: sites dial {args.listen} (Fleet API only) -> {args.upstream}", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
