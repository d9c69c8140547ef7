"""The demo app's HTTP server (examples/demo/app/server.py), run as a real process on a free
port: keep-alive and close rules, pipelining in order, http.server's error answers, the bounds
on heads and idle or stalled clients, /health off the event loop, and the graceful stop.

The image has psycopg2; this venv does not, so the process gets a stand-in package that fails
every connection like an unreachable database, after STUB_DB_DELAY seconds (a slow /health).
The time limits are shortened through the module's constants, read when they are used."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo" / "app"

STUB = {
    "__init__.py": (
        "class Error(Exception): pass\n"
        "class OperationalError(Error): pass\n"
        "class InterfaceError(Error): pass\n"
        "def connect(*args, **kwargs): raise OperationalError('stub: no database')\n"
        "from . import errors, pool  # noqa\n"
    ),
    "errors.py": "from . import Error\nclass UndefinedTable(Error): pass\n",
    "pool.py": (
        "import os, time\n"
        "from . import OperationalError\n"
        "class ThreadedConnectionPool:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        time.sleep(float(os.environ.get('STUB_DB_DELAY', '0')))\n"
        "        raise OperationalError('stub: no database')\n"
    ),
}

SHORT_LIMITS = {"IDLE_KEEPALIVE_SECONDS": 1.0, "SWEEP_SECONDS": 0.1, "DRAIN_SECONDS": 1.5,
                "HANG_SECONDS": 0.5}


class DemoServer:
    def __init__(self, tmp_path: Path, mode: str, db_delay: float,
                 limits: dict[str, float]) -> None:
        stub = tmp_path / "stub" / "psycopg2"
        stub.mkdir(parents=True)
        for name, text in STUB.items():
            (stub / name).write_text(text)
        (tmp_path / "HEALTH_MODE").write_text(f"{mode}\n")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = dict(os.environ, PORT=str(self.port), HEALTH_MODE_FILE=str(tmp_path / "HEALTH_MODE"),
                   MIGRATIONS_DIR=str(tmp_path), VERSION="1234567", GIT_COMMIT="c" * 40,
                   DATABASE_URL="postgresql://demo:s3cret@127.0.0.1:1/demo",
                   STUB_DB_DELAY=str(db_delay),
                   PYTHONPATH=f"{tmp_path / 'stub'}{os.pathsep}{APP_DIR}")
        launch = "import sys, server\n" + "".join(
            f"server.{name} = {value!r}\n" for name, value in limits.items()
        ) + "sys.exit(server.main())\n"
        self.log = tmp_path / "server.log"
        with self.log.open("wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-c", launch], env=env,
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        self.wait_for_log("listening on")

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log.read_text()
            if text in log:
                return log
            assert self.process.poll() is None or text in self.log.read_text(), log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s: {self.log.read_text()}")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., DemoServer]]:
    servers: list[DemoServer] = []

    def start(mode: str = "healthy", db_delay: float = 0.0, **limits: float) -> DemoServer:
        servers.append(DemoServer(tmp_path, mode, db_delay, SHORT_LIMITS | limits))
        return servers[-1]

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a timeout here fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def responses(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Split a stream of responses (each with a Content-Length) into (status line, headers,
    body)."""
    parsed = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        length = int(headers["Content-Length"])
        parsed.append((status, headers, data[:length]))
        data = data[length:]
    return parsed


def test_keep_alive_serves_the_same_documents_and_headers(start) -> None:
    server = start()
    conn = server.http()
    answers = {}
    for path in ("/", "/version", "/nowhere?x=1"):
        conn.request("GET", path)
        reply = conn.getresponse()
        answers[path] = (reply.status, dict(reply.getheaders()), json.loads(reply.read()))
    conn.close()

    assert answers["/"][0] == 200 and answers["/"][2] == {"app": "togather-demo",
                                                          "version": "1234567"}
    assert answers["/version"][2] == {"version": "1234567", "git_commit": "c" * 40,
                                      "build_timestamp": ""}
    assert answers["/nowhere?x=1"][:3:2] == (404, {"error": "not found"})
    headers = answers["/version"][1]
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(json.dumps(answers["/version"][2])))
    assert headers["Cache-Control"] == "no-store"
    assert headers["Server"].startswith("togather-demo Python/3.")
    assert headers["Date"].endswith(" GMT")
    assert "Connection" not in headers
    assert server.log.read_text().count("listening on") == 1  # one process served all three


@pytest.mark.parametrize(("request_head", "keeps_open"), [
    (b"GET / HTTP/1.1\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_the_connection_is_kept_or_closed_as_the_request_says(start, request_head,
                                                              keeps_open) -> None:
    server = start()
    with server.connect() as sock:
        sock.sendall(request_head)
        sock.settimeout(0.5)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
            closed = True
        except TimeoutError:
            closed = False

    assert responses(data)[0][0] == "HTTP/1.1 200 OK"
    assert closed is not keeps_open


def test_pipelined_requests_are_answered_in_order_with_health_in_between(start) -> None:
    server = start(db_delay=0.3)  # /health is answered from a thread, after the requests' own
    with server.connect() as sock:
        sock.sendall(b"GET /version HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n"
                     b"GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
        answers = responses(read_until_closed(sock))

    assert [status for status, _, _ in answers] == [
        "HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable", "HTTP/1.1 200 OK",
        "HTTP/1.1 404 Not Found"]
    assert json.loads(answers[0][2])["version"] == "1234567"
    health = json.loads(answers[1][2])
    assert health["status"] == "unhealthy"
    assert set(health["checks"]) == {"database", "migrations", "job_queue", "http_endpoint"}
    assert health["checks"]["database"]["message"] == "OperationalError: stub: no database"
    assert health["checks"]["http_endpoint"]["status"] == "pass"  # a request to itself
    assert json.loads(answers[2][2])["app"] == "togather-demo"


def test_a_slow_health_check_does_not_hold_up_other_requests(start) -> None:
    server = start(db_delay=2.0)
    slow = server.http()
    slow.request("GET", "/health")
    with server.connect() as sock:
        sock.sendall(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert responses(read_until_closed(sock))[0][0] == "HTTP/1.1 200 OK"
    slow.sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        slow.sock.recv(1, socket.MSG_PEEK)  # the health check is still running
    slow.sock.settimeout(5)
    assert slow.getresponse().status == 503
    slow.close()


@pytest.mark.parametrize(("request_head", "status_line", "has_body"), [
    (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
     "HTTP/1.1 501 Unsupported method ('POST')", True),
    (b"HEAD /version HTTP/1.1\r\n\r\n", "HTTP/1.1 501 Unsupported method ('HEAD')", False),
    (b"BROKEN\r\n\r\n", "HTTP/1.1 400 Bad request syntax ('BROKEN')", True),
    (b"GET / HTTP/2.0\r\n\r\n", "HTTP/1.1 505 Invalid HTTP version (2.0)", True),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", "HTTP/1.1 414 Request-URI Too Long", True),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "HTTP/1.1 431 Line too long", True),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", "HTTP/1.1 431 Too many headers", True),
])
def test_bad_requests_get_http_server_s_error_page_and_a_closed_connection(
        start, request_head, status_line, has_body) -> None:
    server = start()
    with server.connect() as sock:
        sock.sendall(request_head)
        data = read_until_closed(sock)

    head, _, body = data.partition(b"\r\n\r\n")
    assert head.decode().split("\r\n")[0] == status_line
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert (b"<title>Error response</title>" in body) is has_body
    assert server.process.poll() is None


def test_a_request_body_is_skipped_not_taken_for_the_next_request(start) -> None:
    server = start()
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: 20\r\n\r\nGET /x HTTP/1.1\r\n\r\n\r\n"
                     b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
        answers = responses(read_until_closed(sock))

    assert [status for status, _, _ in answers] == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"]


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: stalled"])
def test_an_idle_or_stalled_client_is_dropped_after_the_idle_timeout(start, sent) -> None:
    server = start()
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + sent)
        started = time.monotonic()
        data = read_until_closed(sock)  # closed by the server, or a timeout fails the test
        waited = time.monotonic() - started

    assert responses(data)[0][0] == "HTTP/1.1 200 OK"
    assert waited >= 0.9, waited  # IDLE_KEEPALIVE_SECONDS is 1 s here


def test_hang_mode_never_answers_health_but_serves_the_rest(start) -> None:
    server = start(mode="hang")
    with server.connect() as hung, server.connect() as other:
        hung.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        other.sendall(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert responses(read_until_closed(other))[0][0] == "HTTP/1.1 200 OK"
        assert read_until_closed(hung) == b""  # closed after HANG_SECONDS, no answer


@pytest.mark.parametrize(("mode", "content_type", "body"), [
    ("html", "text/html", b"<html><body><h1>It works!</h1></body></html>"),
    ("garbage", "application/json", b'{"status": "healthy", "checks": '),
])
def test_broken_health_modes_answer_their_broken_body(start, mode, content_type, body) -> None:
    conn = start(mode=mode).http()
    conn.request("GET", "/health")
    reply = conn.getresponse()

    assert (reply.status, reply.getheader("Content-Type"), reply.read()) == (200, content_type,
                                                                               body)


def test_lying_mode_says_unhealthy_with_a_200(start) -> None:
    conn = start(mode="lying").http()
    conn.request("GET", "/health")
    reply = conn.getresponse()

    assert reply.status == 200 and json.loads(reply.read())["status"] == "unhealthy"


def test_sigterm_closes_idle_connections_at_once_and_finishes_busy_requests(start) -> None:
    server = start(db_delay=1.0)
    idle = server.http()
    idle.request("GET", "/version")
    idle.getresponse().read()
    busy = server.http()
    busy.request("GET", "/health")
    time.sleep(0.3)  # the health check is under way

    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log("waiting for in-flight requests")
    idle.sock.settimeout(1)
    assert idle.sock.recv(1) == b""  # closed at once, without an answer
    reply = busy.getresponse()
    assert reply.status == 503 and reply.getheader("Connection") == "close"
    reply.read()
    assert server.process.wait(timeout=10) == 0
    log = server.log.read_text()
    assert "SIGTERM received, shutting down" in log
    assert "closed 1 idle connection(s); waiting for in-flight requests" in log
    assert log.rstrip().endswith("togather-demo: stopped")
    assert "s3cret" not in log
    with pytest.raises(ConnectionRefusedError):
        server.connect()


def test_the_stop_waits_for_a_hung_request_only_until_the_drain_deadline(start) -> None:
    server = start(mode="hang", HANG_SECONDS=30.0)
    with server.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        time.sleep(0.2)
        started = time.monotonic()
        assert server.stop() == 0
        took = time.monotonic() - started

    assert 1.4 <= took < 6, took  # DRAIN_SECONDS is 1.5 s here; the hang would be 30 s
    assert server.log.read_text().rstrip().endswith("togather-demo: stopped")
