"""The devices' door of `fedlora server`: the calls of Flower's Fleet API, exactly, and nothing else.

flwr 1.42's SuperLink serves every API it has on one HTTP port: the Fleet API the devices use, the
Control API an operator uses (list runs, register node keys, submit and stop apps; no account
authentication in Flower's open-source distribution) and the Runtime API of its own ServerApp
processes. `fedlora server` keeps the SuperLink on a loopback only it can reach and puts this gate on
the address the devices are given.

The contract, decided on the request as it arrived, before any decoding or normalisation:

- a request is forwarded only if its method is ``POST``, its request target is byte for byte one
  of :data:`FLEET_CALLS` (the calls Flower's SuperNode makes) and it carries no query string. A
  percent-encoding, a dot segment, a doubled slash, a backslash, another case, an absolute-form
  target or a fragment is not one of those byte strings, so it is refused: no rule strips, decodes
  or resolves anything first (one spelling is invisible to an ASGI app: a bare trailing ``?``, an
  empty query, which the server splits off; it reaches the same constant path);
- the upstream URL is the SuperLink's base joined with the allowlisted constant, never with the
  request's text; the ``Host`` and hop-by-hop headers are the gate's own, every other header passes
  unchanged (node authentication signs the request, and the SuperLink checks that signature);
- a refusal answers 403 with a sentence and writes one line to the gate's log (method, the target
  as received, the peer's address); an HTTP/1.1 parser (h11, chosen explicitly: it hands the target
  over verbatim) rejects what is not HTTP/1.1, HTTP/2 included, before the app sees it, and logs it.

Dependencies on this path, each already required by flwr for its own HTTP transport: uvicorn
(server), h11 (parser), httpx (client). No proxy library: the forwarding is the 40 lines below.

    python -m fedlora.deploy.fleet_gate --listen HOST:PORT | --fd N --upstream HOST:PORT [--certfile F --keyfile F --ca F]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedlora.deploy.reaper import die_with_parent

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Every call of flwr 1.41-1.42's Fleet API (flwr.supernode.fleet_http_client); a test holds this set
# equal to Flower's own route table, so an upgrade that adds a call fails a test, not the devices.
FLEET_CALLS: frozenset[str] = frozenset(
    "/v1/fleet/" + name
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
_ALLOWED: dict[bytes, str] = {path.encode("ascii"): path for path in FLEET_CALLS}
FLEET_METHOD = "POST"
READY = "gate ready: forwarding"  # the gate's first log line, once it serves
REFUSED = (
    "this address serves devices only (Flower's Fleet API calls, exactly as the SuperNode makes them); "
    "the Control API and the rest of the SuperLink are reachable by the server's operator only"
)
# Headers that belong to one hop (RFC 9110 7.6.1) and the upstream's Host: the gate sets its own,
# never copies the request's or the response's. A Content-Length passes: the body is streamed
# through unchanged, and each side's HTTP parser holds the body to it.
_OWN_HEADERS = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Who sent a request is the gate's to say: the SuperLink (uvicorn, trusting 127.0.0.1) logs the
# address in X-Forwarded-For, so a device's own forwarding headers are dropped and the peer's set.
_FORWARDING = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"}
)

log = logging.getLogger("fedlora.gate")


def admit(method: str, raw_path: bytes, query_string: bytes) -> str | None:
    """The allowlisted Fleet call a request is, or None: ``method`` exactly ``POST``, ``raw_path``
    (the request target before ``?``, as received) exactly one of :data:`FLEET_CALLS`, no query."""
    if method != FLEET_METHOD or query_string:
        return None
    return _ALLOWED.get(raw_path)


def _shown(raw: bytes, limit: int = 200) -> str:
    """A request target for a log line: printable, one line, bounded."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(raw) > limit else "")


class FleetGate:
    """ASGI app: :func:`admit`-ed requests forwarded to ``upstream_base`` (``scheme://host:port``),
    everything else 403. ``client`` is the one httpx.AsyncClient the forwarding uses."""

    def __init__(self, upstream_base: str, client: Any) -> None:  # client: httpx.AsyncClient
        self.upstream_base = upstream_base.rstrip("/")
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                if event == "lifespan.startup":
                    log.info("%s %d Fleet API calls to %s", READY, len(FLEET_CALLS), self.upstream_base)
                    await send({"type": "lifespan.startup.complete"})
                elif event == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":  # websockets: nothing of Flower's uses them here
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        raw_path, query = scope.get("raw_path") or b"", scope.get("query_string") or b""
        call = admit(scope["method"], raw_path, query)
        if call is None:
            peer = scope.get("client") or ("?", 0)
            log.warning(
                "refused %s %s from %s", scope["method"], _shown(raw_path + (b"?" + query if query else b"")), peer[0]
            )
            await _respond(send, 403, b'{"detail": "' + REFUSED.encode() + b'"}')
            return
        await self._forward(call, scope, receive, send)

    async def _forward(self, call: str, scope: Scope, receive: Receive, send: Send) -> None:
        import httpx

        async def body():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                yield msg.get("body", b"")
                if not msg.get("more_body", False):
                    return

        peer = (scope.get("client") or ("unknown", 0))[0]
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _OWN_HEADERS | _FORWARDING]
        headers += [(b"x-forwarded-for", peer.encode()), (b"x-forwarded-proto", scope.get("scheme", "http").encode())]
        request = self.client.build_request(FLEET_METHOD, self.upstream_base + call, headers=headers, content=body())
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("could not forward %s %s to the SuperLink: %r", FLEET_METHOD, call, exc)
            await _respond(send, 502, b'{"detail": "the SuperLink did not answer"}')
            return
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _OWN_HEADERS]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(upstream: str, tls: bool, ca_certfile: str | None = None) -> FleetGate:
    """The gate for the SuperLink at ``upstream`` (``host:port``), over TLS checked against
    ``ca_certfile`` when ``tls``."""
    import httpx

    # No timeout: a node's pull may wait on the SuperLink as long as the SuperLink lets it.
    client = httpx.AsyncClient(
        verify=ca_certfile if (tls and ca_certfile) else tls, timeout=None, follow_redirects=False
    )
    return FleetGate(f"{'https' if tls else 'http'}://{upstream}", client)


class _OneLine(logging.Filter):
    """A record with an exception as one line with its cause, not a traceback per failed request
    (while the SuperLink restarts, every node's poll fails)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = f"{record.getMessage().splitlines()[0].rstrip(': ')}: {record.exc_info[1]!r}", ()
            record.exc_info = record.exc_text = None
        return True


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m fedlora.deploy.fleet_gate", description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", help="HOST:PORT the devices connect to")
    where.add_argument(
        "--fd",
        type=int,
        help="a listening socket inherited from the parent (fedlora server binds "
        "it before it moves the SuperLink into its private network)",
    )
    ap.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    ap.add_argument("--certfile")
    ap.add_argument("--keyfile")
    ap.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    args = ap.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Refusals and upstream failures only: a line per forwarded request (each node polls every few
    # seconds) would grow gate.log without bound over a long run.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # a logger's own filter would miss its children's records
        handler.addFilter(_OneLine())
    app = create_app(args.upstream, bool(args.certfile), args.ca)
    where_kw: dict[str, Any] = (
        {"fd": args.fd} if args.fd is not None else dict(zip(("host", "port"), _host_port(args.listen)))
    )
    # h11, not httptools: h11 hands the request target over byte for byte (httptools parses an
    # absolute-form target down to its path); "warning" keeps the parser's own refusals in the log.
    uvicorn.run(
        app,
        **where_kw,
        http="h11",
        ws="none",
        lifespan="on",
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
