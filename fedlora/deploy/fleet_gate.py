"""The devices' door of `fedlora server`: Flower's Fleet API on the public address, nothing else.

flwr 1.42's SuperLink serves every API it has on one HTTP port: the Fleet API the devices use
(``/v1/fleet/``), the Control API an operator uses (``/v1/control/``: list runs, register node
keys, submit and stop apps; no account authentication in Flower's open-source distribution) and
the Runtime API its own ServerApp processes use (``/v1/runtime/``). Anyone who reaches that port
with the CA certificate could enrol a key of their own or submit code to run on the server and on
every device.

So `fedlora server` binds the SuperLink to loopback only and puts this gate on the address the
devices are given: a reverse proxy (``fastapi-proxy-lib`` over one ``httpx`` client) that
forwards ``/v1/fleet/*`` to the SuperLink unchanged, headers included (node authentication signs
requests, so a node's signature still reaches the SuperLink and is checked there), and answers
every other path with 403 and a sentence saying where the Control API is. TLS ends at the gate
with the server's certificate and starts again to the SuperLink, checked against the same CA.

    python -m fedlora.deploy.fleet_gate --listen HOST:PORT --upstream HOST:PORT [--certfile F --keyfile F --ca F]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from fedlora.deploy.reaper import die_with_parent

FLEET_PREFIX = "/v1/fleet/"
REFUSED = ("this address serves devices only (Flower's Fleet API, {prefix}); the Control API and the rest of "
           "the SuperLink listen on the server's loopback, for its operator")

log = logging.getLogger("fedlora.gate")


def create_app(upstream: str, tls: bool, ca_certfile: str | None = None):  # noqa: ANN201 - a Starlette app
    """The gate's ASGI app: ``/v1/fleet/*`` forwarded to ``upstream`` (``host:port``), all else 403."""
    import httpx
    from fastapi_proxy_lib.core.http import ReverseHttpProxy
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    scheme = "https" if tls else "http"
    # No timeout: a node's pull may wait on the SuperLink as long as the SuperLink lets it.
    client = httpx.AsyncClient(verify=ca_certfile if (tls and ca_certfile) else tls, timeout=None)
    proxy = ReverseHttpProxy(client, base_url=f"{scheme}://{upstream}{FLEET_PREFIX}")
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    async def fleet(request: Request):  # noqa: ANN202
        return await proxy.proxy(request=request, path=request.path_params["path"])

    async def refuse(request: Request):  # noqa: ANN202
        log.warning("refused %s %s from %s", request.method, request.url.path,
                    request.client.host if request.client else "?")
        return JSONResponse({"detail": REFUSED.format(prefix=FLEET_PREFIX)}, status_code=403)

    @contextlib.asynccontextmanager
    async def lifespan(app):  # noqa: ANN001, ANN202
        yield
        await proxy.aclose()

    return Starlette(routes=[Route(FLEET_PREFIX + "{path:path}", fleet, methods=methods),
                             Route("/{path:path}", refuse, methods=methods)],
                     lifespan=lifespan)


class _OneLine(logging.Filter):
    """An upstream failure (the SuperLink restarting) as one line with its cause, not a traceback of
    httpx internals per request: while the SuperLink is down every node's poll fails."""

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
    ap.add_argument("--listen", required=True, help="HOST:PORT the devices connect to")
    ap.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    ap.add_argument("--certfile")
    ap.add_argument("--keyfile")
    ap.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    args = ap.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Refusals and upstream failures only: a line per forwarded request (each node polls every 3 s)
    # would grow gate.log by megabytes over a long run.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # a logger's own filter would miss its children's records
        handler.addFilter(_OneLine())
    tls = bool(args.certfile)
    host, port = _host_port(args.listen)
    app = create_app(args.upstream, tls, args.ca)
    uvicorn.run(app, host=host, port=port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
