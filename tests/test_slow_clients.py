"""Slow and stalled clients against a live server (raw sockets): none holds its connection past a deadline,
and other clients are served normally meanwhile.

The server is the real app on uvicorn with the settings ``promcse serve`` uses (``launch.uvicorn_config``: the
h11 protocol with a header deadline, the keep-alive timeout, the connection limit) and short timeouts, so the
bounds are measured in seconds. Each bound is generous (a loaded 2-core box) but far below "forever".
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import promcse.cli
from promcse.errors import PromcseError

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from promcse.serving.launch import BackgroundServer, check_connection_options, load_server, uvicorn_config  # noqa: E402
from promcse.serving.app import Limits, ServeOptions, create_app  # noqa: E402

HEADER_S, BODY_S, KEEP_ALIVE_S = 1.0, 1.0, 1.0
SLACK = 4.0  # seconds past a deadline before the test calls the connection "held"


@pytest.fixture(scope="module")
def server(tiny_bert: Path) -> Iterator[BackgroundServer]:
    registry, indexes = load_server({"tiny": str(tiny_bert)}, device="cpu")
    options = ServeOptions(header_timeout_s=HEADER_S, body_timeout_s=BODY_S, keep_alive_s=KEEP_ALIVE_S)
    with BackgroundServer(create_app(registry, indexes, Limits(), options)) as running:
        yield running


def connect(server: BackgroundServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=SLACK + 10)
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, TimeoutError):
        pytest.fail(f"the server held the connection for over {limit} s (got {data[:200]!r})")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> threading.Thread:
    """Send ``data`` one byte at a time, ``every`` seconds apart, until done, stopped or disconnected."""

    def run() -> None:
        for byte in data:
            if stop.wait(every):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def served_normally(server: BackgroundServer) -> None:
    """A normal client gets its answer at once while the slow ones hang on."""
    start = time.monotonic()
    response = httpx.post(server.url + "/embed", json={"texts": ["a man plays guitar"]}, timeout=30)
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 1
    assert time.monotonic() - start < HEADER_S, "a normal request waited behind the slow clients"


def test_headers_sent_a_byte_at_a_time_are_cut_off_while_others_are_served(server: BackgroundServer) -> None:
    stop = threading.Event()
    slow = [connect(server) for _ in range(4)]
    head = b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    threads = [trickle(sock, head, 0.05, stop) for sock in slow]
    try:
        time.sleep(0.3)
        served_normally(server)
        for sock in slow:
            data, waited = read_until_closed(sock, HEADER_S + SLACK)
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert b"request headers not received within 1 s" in data
    finally:
        stop.set()
        for sock in slow:
            sock.close()
    for thread in threads:
        thread.join(timeout=5)


def test_a_connection_that_sends_nothing_is_closed(server: BackgroundServer) -> None:
    with connect(server) as sock:
        data, waited = read_until_closed(sock, HEADER_S + SLACK)
    assert data.startswith(b"HTTP/1.1 408") and waited >= HEADER_S * 0.9


def test_a_stalled_body_gets_408_and_the_connection_is_closed(server: BackgroundServer) -> None:
    body = json.dumps({"texts": ["a man plays guitar"] * 4}).encode()
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        served_normally(server)
        data, waited = read_until_closed(sock, BODY_S + SLACK)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
    error = json.loads(payload)["error"]
    assert error["status"] == 408 and "body not received within 1 s" in error["message"]


def test_a_trickled_body_is_bounded_by_one_deadline_not_per_byte(server: BackgroundServer) -> None:
    """A byte every 0.2 s never lets any single read wait long, but the whole body still has one deadline."""
    body = json.dumps({"texts": ["x" * 200]}).encode()
    stop = threading.Event()
    with connect(server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body) + 14).encode() + b"\r\n\r\n")
        thread = trickle(sock, body, 0.2, stop)
        try:
            data, waited = read_until_closed(sock, BODY_S + SLACK)
        finally:
            stop.set()
    thread.join(timeout=5)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"  # OpenAI's error shape on /v1/


def test_keep_alive_idle_and_trickled_next_requests_are_closed(server: BackgroundServer) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(server) as sock:  # idle after a response: uvicorn's keep-alive timeout
        sock.sendall(request)
        time.sleep(0.2)
        data, waited = read_until_closed(sock, KEEP_ALIVE_S + SLACK)
        assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1
    stop = threading.Event()
    with connect(server) as sock:  # the next request's head trickled: uvicorn alone would wait forever
        sock.sendall(request)
        time.sleep(0.2)
        thread = trickle(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 500, 0.05, stop)
        try:
            data, waited = read_until_closed(sock, HEADER_S + SLACK)
        finally:
            stop.set()
        thread.join(timeout=5)
    assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data


def test_a_slow_client_within_the_deadlines_is_served(server: BackgroundServer) -> None:
    body = json.dumps({"texts": ["two dogs run"]}).encode()
    head = (b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with connect(server) as sock:
        for part in (head[:20], head[20:50], head[50:], body[:5], body[5:]):
            sock.sendall(part)
            time.sleep(0.1)
        data, _ = read_until_closed(sock, 30)
    assert data.startswith(b"HTTP/1.1 200"), data[:300]


def test_an_unfinished_head_over_16_kib_gets_400_at_once(server: BackgroundServer) -> None:
    with connect(server) as sock:  # no blank line: h11 refuses to buffer more of an incomplete head
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000)
        data, waited = read_until_closed(sock, SLACK)
    assert data.startswith(b"HTTP/1.1 400") and waited < HEADER_S, data[:200]


def test_uvicorn_runs_h11_and_asyncio_whatever_else_is_installed() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    config = uvicorn_config(lambda scope, receive, send: None, ServeOptions(max_connections=7))
    config.load()
    assert issubclass(config.http_protocol_class, H11Protocol)  # not httptools, even where ray installed it
    assert config.loop == "asyncio" and config.ws == "none"
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == ServeOptions().keep_alive_s


@pytest.mark.parametrize("argv", [["--header-timeout", "0"], ["--body-timeout", "nan"],
                                  ["--keep-alive-timeout", "-1"], ["--max-connections", "0"]])
def test_serve_refuses_timeouts_that_never_fire_or_admit_nothing(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stop:  # argparse refuses it, naming the option
        promcse.cli.main(["serve", "--model", "a=x", *argv])
    assert stop.value.code == 2


def test_library_callers_get_the_same_checks() -> None:
    for bad, field in ((ServeOptions(header_timeout_s=0), "header_timeout_s"),
                       (ServeOptions(body_timeout_s=float("nan")), "body_timeout_s"),
                       (ServeOptions(keep_alive_s=float("inf")), "keep_alive_s"),
                       (ServeOptions(max_connections=0), "max_connections")):
        with pytest.raises(PromcseError, match=f"^key '{field}': "):  # the field, as the caller set it
            check_connection_options(bad)
    check_connection_options(ServeOptions())
