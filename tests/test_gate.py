"""The devices' address of `fedlora server`, attacked: the real gate process (``python -m
fedlora.deploy.fleet_gate``, TLS on both hops) in front of a recording upstream that stands in for
the SuperLink. Request targets are sent as raw bytes (an HTTP client would normalise them first),
over HTTP/1.1 and as HTTP/2; whatever the target, the upstream sees only the allowlisted Fleet
calls, at their allowlisted paths, and every refusal leaves a line in the gate's log."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.deploy.fleet_gate import FLEET_CALLS, admit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tests use Linux")


class Recorder(http.server.BaseHTTPRequestHandler):
    """The stand-in SuperLink: records (method, request target as received) and answers 200."""

    seen: list[tuple[str, str]] = []
    headers_seen: list[dict[str, list[str]]] = []  # each request's headers, by lower-case name
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        self.seen.append((self.command, self.path))
        got: dict[str, list[str]] = {}
        for k, v in self.headers.items():
            got.setdefault(k.lower(), []).append(v)
        self.headers_seen.append(got)
        length = int(self.headers.get("content-length") or 0)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                self.rfile.read(size + 2)
            self.rfile.readline()
        elif length:
            self.rfile.read(length)
        body = b"upstream:" + self.path.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    from fedlora.deploy.pki import create_credentials
    from fedlora.deploy.processes import free_port, wait_for_port

    tmp = tmp_path_factory.mktemp("gate")
    creds = create_credentials(tmp / "creds", ["127.0.0.1"], nodes=0)
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(creds.server_cert, creds.server_key)
    upstream.socket = ctx.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port, log = free_port(), tmp / "gate.log"
    proc = gate_process(port, upstream.server_address[1], creds, log)
    try:
        wait_for_port("127.0.0.1", port, proc, log)
        yield port, Recorder.seen, log, creds.ca_cert
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.shutdown()


def gate_process(port: int, upstream_port: int, creds, log: Path) -> subprocess.Popen:
    """The real gate on 127.0.0.1:``port`` in front of 127.0.0.1:``upstream_port``, TLS on both hops."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedlora.deploy.fleet_gate",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"127.0.0.1:{upstream_port}",
            "--certfile",
            str(creds.server_cert),
            "--keyfile",
            str(creds.server_key),
            "--ca",
            str(creds.ca_cert),
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def tls_socket(port: int, ca: Path, alpn: list[str] | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")


def send_raw(port: int, ca: Path, method: bytes, target: bytes, extra: bytes = b"") -> int | None:
    """One HTTP/1.1 request with ``target`` exactly as given; the status code, or None if the gate
    closed the connection without one."""
    with tls_socket(port, ca) as s:
        s.sendall(
            method
            + b" "
            + target
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/protobuf\r\n"
            + extra
            + b"content-length: 3\r\nconnection: close\r\n\r\nabc"
        )
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data.split(b" ", 2)[1])


def log_lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def refusal_logged(log: Path, before: int, timeout: float = 3.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        new = log_lines(log)[before:]
        if any("refused" in x or "Invalid HTTP request" in x for x in new):
            return True
        time.sleep(0.02)
    return False


# What an attacker mixes into a request target: the allowed prefix and calls, the Control API's
# calls, dot segments and their encodings (single and double, either case, overlong UTF-8), slashes
# and backslashes raw and encoded, look-alikes of '.' and '/', case changes.
SEGMENTS = [
    "v1",
    "fleet",
    "control",
    "runtime",
    "list-runs",
    "list-nodes",
    "start-run",
    "register-node",
    "pull-messages",
    "push-messages",
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    "%2e",
    "%2E",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "%c0%ae%c0%ae",
    "..%2f",
    "..%2F",
    "..%5c",
    "..\\",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "",
    "V1",
    "Fleet",
    "FLEET",
    "Pull-Messages",
    "\uff0e\uff0e",
    "\u2024\u2024",
    "\u2215",
    "\uff0f",
    ";",
    "%00",
    "%20",
]
SEPARATORS = ["/", "//", "\\", "%2f", "/./", "/../"]
PREFIXES = [
    "",
    "/v1/fleet/",
    "/v1/",
    "/",
    "//v1/fleet/",
    "https://127.0.0.1",
    "http://evil.example",
    "/v1/fleet/..",
    "/v1/fleet/%2e%2e/",
]
SUFFIXES = ["", "?", "?x=1", "#frag", "/", "%20", ";a"]
METHODS = ["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "post", "CONNECT", "TRACE"]


@st.composite
def hostile_target(draw) -> bytes:
    parts = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(parts), max_size=len(parts)))
    text = (
        draw(st.sampled_from(PREFIXES)) + "".join(s + p for s, p in zip(seps, parts)) + draw(st.sampled_from(SUFFIXES))
    )
    if draw(st.booleans()):  # sometimes the real call, disguised only by the suffix or a prefix
        text = (
            draw(st.sampled_from(PREFIXES[:2]))
            + draw(st.sampled_from(sorted(FLEET_CALLS)))
            + draw(st.sampled_from(SUFFIXES))
        )
    return text.encode("utf-8")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), target=hostile_target())
def test_hostile_targets_reach_the_superlink_only_as_allowlisted_fleet_calls(gate, method, target):
    port, seen, log, ca = gate
    before_seen, before_log = len(seen), len(log_lines(log))
    status = send_raw(port, ca, method.encode(), target)
    new = seen[before_seen:]
    # Whatever was sent, the upstream saw only allowlisted calls, by POST, at their exact paths.
    assert all(m == "POST" and p in FLEET_CALLS for m, p in new), (target, new)
    # A bare '?' (an empty query) is the one spelling ASGI cannot tell from none (the server splits
    # the target there); it is forwarded to the constant path: the same call.
    if method == "POST" and target.removesuffix(b"?") in {c.encode() for c in FLEET_CALLS}:
        assert status == 200 and new == [("POST", target.decode().removesuffix("?"))], (target, status, new)
    else:
        assert new == [], (target, new)
        assert status != 200, (target, status)
        assert refusal_logged(log, before_log), (target, log_lines(log)[before_log:])


def test_each_fleet_call_is_forwarded_to_its_constant_path_and_the_rest_refused_with_a_sentence(gate):
    port, seen, log, ca = gate
    for call in sorted(FLEET_CALLS):
        before = len(seen)
        assert send_raw(port, ca, b"POST", call.encode()) == 200
        assert seen[before:] == [("POST", call)]
    # The attacks that went through the previous gate, each refused and logged.
    for target in [
        b"/v1/fleet/../control/list-runs",
        b"/v1/fleet/%2e%2e/control/list-runs",
        b"/v1/fleet/%2E%2E/control/list-runs",
        b"/v1/fleet/./../control/list-runs",
        b"/v1/fleet/..%2fcontrol/list-nodes",
        b"/v1/control/list-runs",
        b"/v1/control/start-run",
        b"/v1/runtime/pull-messages",
        b"https://127.0.0.1/v1/fleet/pull-messages",
        b"/v1/fleet/pull-messages?x=1",
        b"/V1/fleet/pull-messages",
        b"//v1/fleet/pull-messages",
    ]:
        before, before_log = len(seen), len(log_lines(log))
        with tls_socket(port, ca) as s:
            s.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 403"), (target, reply[:200])
        assert b"serves devices only" in reply, reply
        assert seen[before:] == [], target
        assert any(f"refused POST {target.decode()} from 127.0.0.1" in x for x in log_lines(log)[before_log:]), target


def test_headers_pass_but_host_hop_by_hop_and_forwarding_headers_are_the_gates_own(gate):
    port, seen, log, ca = gate
    with tls_socket(port, ca) as s:
        s.sendall(
            b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: evil.example\r\nflwr-signature: abc\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
            b"Upgrade: h2c\r\nConnection: close, Upgrade\r\ncontent-length: 0\r\n\r\n"
        )
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"upstream:/v1/fleet/pull-messages"), reply
    got = Recorder.headers_seen[-1]
    assert got["flwr-signature"] == ["abc"]  # the node's signature reaches the SuperLink
    assert got["x-forwarded-for"] == ["127.0.0.1"] and got["x-forwarded-proto"] == ["https"], got
    assert "forwarded" not in got and "x-real-ip" not in got and "upgrade" not in got, got
    assert got["host"] != ["evil.example"], got


def test_http2_is_refused_before_it_reaches_the_upstream(gate):
    """HTTP/2 over TLS (ALPN h2 offered; the gate selects none) and HTTP/2 with prior knowledge: the
    gate's HTTP/1.1 parser refuses the connection preface, logs it, and nothing is forwarded."""
    import h2.config
    import h2.connection

    port, seen, log, ca = gate
    for alpn in (["h2"], None):
        before, before_log = len(seen), len(log_lines(log))
        with tls_socket(port, ca, alpn) as s:
            assert s.selected_alpn_protocol() in (None, "http/1.1")
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(
                1,
                [
                    (":method", "POST"),
                    (":authority", "127.0.0.1"),
                    (":scheme", "https"),
                    (":path", "/v1/fleet/../control/list-runs"),
                ],
                end_stream=True,
            )
            s.sendall(conn.data_to_send())
            try:
                reply = b"".join(iter(lambda: s.recv(65536), b""))
            except (ConnectionResetError, ssl.SSLError):
                reply = b""
        assert b" 200 " not in reply[:20], reply[:200]
        assert seen[before:] == []
        assert refusal_logged(log, before_log), log_lines(log)[before_log:]


def test_admit_is_exact_on_method_path_and_query():
    assert admit("POST", b"/v1/fleet/pull-messages", b"") == "/v1/fleet/pull-messages"
    for method, path, query in [
        ("GET", b"/v1/fleet/pull-messages", b""),
        ("post", b"/v1/fleet/pull-messages", b""),
        ("POST", b"/v1/fleet/pull-messages", b"a=1"),
        ("POST", b"/v1/fleet/pull-messages/", b""),
        ("POST", b"/v1/fleet/%70ull-messages", b""),
        ("POST", b"/v1/fleet/", b""),
        ("POST", b"/v1/control/list-runs", b""),
    ]:
        assert admit(method, path, query) is None, (method, path, query)


def test_the_allowlist_is_exactly_the_fleet_calls_flower_makes():
    """An upgrade of Flower that adds or renames a Fleet call fails here, not on the devices."""
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES as REQUEST_TYPES  # the SuperLink's routes

    fleet = {path for method, path in REQUEST_TYPES if path.startswith("/v1/fleet/")}
    assert {method for method, path in REQUEST_TYPES if path.startswith("/v1/fleet/")} == {"POST"}
    assert fleet == FLEET_CALLS


def test_the_gate_app_refuses_everything_but_the_fleet_calls_with_a_sentence():
    from starlette.testclient import TestClient

    from fedlora.deploy.fleet_gate import create_app

    with TestClient(create_app("127.0.0.1:9", tls=False)) as gate:
        for method, path in [
            ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/start-run"),
            ("POST", "/v1/runtime/pull-messages"),
            ("GET", "/"),
            ("POST", "/v1/fleetx/a"),
        ]:
            res = gate.request(method, path)
            assert res.status_code == 403, (path, res.status_code)
            assert "devices only" in res.json()["detail"] and "operator only" in res.json()["detail"]
        # A fleet path is forwarded (here to a port nobody serves: the proxy's 502, not the gate's 403).
        assert gate.post("/v1/fleet/pull-messages", content=b"").status_code == 502


def test_a_superlink_that_does_not_answer_is_a_502_and_one_log_line_per_request(tmp_path):
    """While the SuperLink is down every node's poll fails at the gate: each is answered 502 and
    logged as one line with its cause, never a traceback."""
    from fedlora.deploy.pki import create_credentials
    from fedlora.deploy.processes import free_port, wait_for_port

    creds = create_credentials(tmp_path / "creds", ["127.0.0.1"], nodes=0)
    port, log = free_port(), tmp_path / "gate.log"
    proc = gate_process(port, free_port(), creds, log)  # nobody listens upstream
    try:
        wait_for_port("127.0.0.1", port, proc, log)
        codes = [send_raw(port, creds.ca_cert, b"POST", b"/v1/fleet/pull-messages") for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(10)
    assert codes == [502, 502, 502]
    text = log.read_text()
    failed = [line for line in text.splitlines() if "could not forward" in line]
    assert len(failed) == 3 and all("Error" in line for line in failed), text
    assert "Traceback" not in text, text
