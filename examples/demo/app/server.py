"""Togather demo server: a tiny stand-in for the real Togather API, used to exercise deployments.

It is deliberately small but honest: ``GET /health`` really queries PostgreSQL, compares the
applied schema version with the migrations baked into the image, checks that a background job
worker is alive and makes a real HTTP request to the server itself. A broken deployment therefore
shows up as a failing health gate, exactly as it would with the real application.

HTTP is served by one asyncio event loop on one thread (no thread per connection contending for
the GIL, so the app's cost per request stays the same whoever its client is); what blocks runs
elsewhere: the health checks in a small thread pool, the job worker in its own thread.

Environment: PORT (8080), DATABASE_URL, VERSION, GIT_COMMIT, BUILD_TIMESTAMP, MIGRATIONS_DIR
(/app/migrations), HEALTH_MODE_FILE (/app/HEALTH_MODE), SLOW_START_SECONDS (30).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import html
import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import DEFAULT_ERROR_CONTENT_TYPE, DEFAULT_ERROR_MESSAGE
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg2
import psycopg2.errors
import psycopg2.pool

PORT = int(os.environ.get("PORT", "8080"))
DATABASE_URL = os.environ.get("DATABASE_URL", "")
GIT_COMMIT = os.environ.get("GIT_COMMIT", "")
VERSION = os.environ.get("VERSION") or GIT_COMMIT[:7] or "0000000"
BUILD_TIMESTAMP = os.environ.get("BUILD_TIMESTAMP", "")
MIGRATIONS_DIR = Path(os.environ.get("MIGRATIONS_DIR", "/app/migrations"))
HEALTH_MODE_FILE = Path(os.environ.get("HEALTH_MODE_FILE", "/app/HEALTH_MODE"))
SLOW_START_SECONDS = float(os.environ.get("SLOW_START_SECONDS", "30"))
HEALTH_MODES = {"healthy", "degraded", "unhealthy", "crash", "slow",
                # Faults of the health endpoint itself, for the deploy tool's fault tests:
                # an HTML error page, a body that is not JSON, a 200 that says unhealthy,
                # and an endpoint that never answers.
                "html", "garbage", "lying", "hang",
                # Healthy, but refuses a schema migrated past this build (an app whose old
                # release cannot run on the newer schema), for rollback --restore-db tests.
                "schema-exact"}
HANG_SECONDS = 60

POOL_MIN, POOL_MAX = 1, 4  # serves /health; the job worker has its own connection
# connect_timeout bounds connecting; tcp_user_timeout bounds queries on a connection whose peer
# silently vanished (firewall, host down), so /health can't hang on it.
CONNECT_ARGS = {"connect_timeout": 2, "tcp_user_timeout": 3000, "application_name": "togather-demo"}
HEARTBEAT_MAX_AGE = 10.0  # seconds without a successful worker run before job_queue fails
DRAIN_SECONDS = 5.0  # how long shutdown waits for in-flight requests
# An idle keep-alive connection is kept this long: longer than the proxy keeps its idle
# upstream connections (keepalive_timeout 30s), so the proxy never reuses one being closed.
IDLE_KEEPALIVE_SECONDS = 75
SWEEP_SECONDS = 1.0  # how often connections past that are looked for
# A request head of at most 64 KiB (http.server's limit per line, here for the whole head, so a
# client can make a connection buffer no more) and 100 headers; bodies (unused) are read and
# dropped, up to 64 MiB (the proxy passes 100 MiB by default: proxy.max_body_size).
MAX_HEAD, MAX_HEADERS, MAX_BODY = 65536, 100, 64 << 20
LISTEN_BACKLOG = 128
SERVER = f"togather-demo Python/{sys.version.split()[0]}"  # http.server's Server header
REASONS = {status.value: status.phrase for status in HTTPStatus}

STARTED = time.monotonic()
# A burst of concurrent probes waits for a free connection instead of exhausting the pool.
HEALTH_SLOTS = threading.BoundedSemaphore(POOL_MAX)


def log(message: str) -> None:
    """One short line on stderr; Docker adds the timestamps."""
    print(f"togather-demo: {message}", file=sys.stderr, flush=True)


def describe_error(exc: BaseException) -> str:
    """Exception class plus a scrubbed first line: never leak the URL or the password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    password = urlsplit(DATABASE_URL).password if DATABASE_URL else None
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    text = re.sub(r"\b\w+://\S+", "<url>", text)
    text = re.sub(r"password\s*=\s*\S+", "password=***", text, flags=re.IGNORECASE)
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def read_health_mode() -> str:
    """The simulated health behaviour, read once at start (file absent means healthy)."""
    try:
        mode = HEALTH_MODE_FILE.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return "healthy"
    return mode or "healthy"


def expected_migration_version() -> int | None:
    """Largest numeric prefix among the migration files shipped in the image."""
    versions = [
        int(m.group(1)) for p in MIGRATIONS_DIR.glob("*.sql") if (m := re.match(r"(\d+)_", p.name))
    ]
    return max(versions, default=None)


class Database:
    """Lazily created ThreadedConnectionPool: a database that is down at start (or goes away
    later) must never crash the app, and a broken connection is discarded, never pooled again."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _get_pool(self) -> psycopg2.pool.ThreadedConnectionPool:
        with self._lock:
            if self._closed:
                raise RuntimeError("database pool is closed")
            if not self._dsn:
                raise RuntimeError("DATABASE_URL is not set")
            if self._pool is None:
                self._pool = psycopg2.pool.ThreadedConnectionPool(
                    POOL_MIN, POOL_MAX, self._dsn, **CONNECT_ARGS
                )
            return self._pool

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A pinged autocommit connection; on any error it is closed instead of returned."""
        pool = self._get_pool()
        # Idle pooled connections go stale when PostgreSQL restarts: ping, drop and retry until a
        # fresh one is made (if the server is down, getconn() itself raises at once).
        for attempt in range(POOL_MIN + 1):
            conn = pool.getconn()
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                break
            except Exception as exc:
                pool.putconn(conn, close=True)
                stale = isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError)
                if not stale or attempt == POOL_MIN:
                    raise
        try:
            yield conn
        except BaseException:
            pool.putconn(conn, close=True)
            raise
        pool.putconn(conn, close=bool(conn.closed))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.closeall()


class JobWorker(threading.Thread):
    """Drains the ``jobs`` queue every second and records a heartbeat after each good run.

    It uses its own connection rather than the pool, so that its reconnect attempts against an
    unreachable database (up to connect_timeout each) never hold up /health."""

    def __init__(self) -> None:
        super().__init__(name="job-worker", daemon=True)
        self.stop_event = threading.Event()
        self.last_ok: float | None = None
        self.processed = 0
        self._failing = False

    def run(self) -> None:
        conn = None
        while True:
            try:
                if conn is None:
                    if not DATABASE_URL:
                        raise RuntimeError("DATABASE_URL is not set")
                    conn = psycopg2.connect(DATABASE_URL, **CONNECT_ARGS)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(
                        "UPDATE jobs SET state = 'done', finished_at = now(), updated_at = now()"
                        " WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id"
                        " LIMIT 10 FOR UPDATE SKIP LOCKED)"
                    )
                    self.processed += cur.rowcount
                self.last_ok = time.monotonic()
                if self._failing:
                    log("job worker: recovered")
                self._failing = False
            except Exception as exc:  # keep going whatever happens; log only on transitions
                if conn is not None:
                    conn.close()  # possibly broken: reconnect on the next run
                    conn = None
                if not self._failing and not self.stop_event.is_set():
                    log(f"job worker: {describe_error(exc)} (retrying every second)")
                self._failing = True
            if self.stop_event.wait(1.0):
                break
        if conn is not None:
            conn.close()


def check(status: str, message: str, started: float, **details: Any) -> dict[str, Any]:
    """One entry of the health contract's ``checks`` object."""
    result: dict[str, Any] = {
        "status": status,
        "message": message,
        "latency": f"{round((time.monotonic() - started) * 1000)}ms",
    }
    if details:
        result["details"] = details
    return result


class App:
    """Process-wide state shared by the request handlers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.db = Database(DATABASE_URL)
        self.worker = JobWorker()
        self.expected_version = expected_migration_version()
        self.in_flight = 0  # requests being answered in a task (on the loop's thread only)
        self.connections = Connections()

    def health(self) -> tuple[int, dict[str, Any]]:
        """Run all checks; 503 if any fails, 200 otherwise (degraded when any warns)."""
        checks: dict[str, dict[str, Any]] = {}
        with HEALTH_SLOTS:
            started = time.monotonic()
            try:
                with self.db.connection() as conn:  # already pinged with SELECT 1
                    checks["database"] = check(
                        "pass",
                        "PostgreSQL connection successful",
                        started,
                        server_version=conn.server_version,
                    )
                    checks["migrations"] = self._migrations_check(conn)
                    checks["job_queue"] = self._job_queue_check(conn)
            except Exception as exc:
                checks.setdefault("database", check("fail", describe_error(exc), started))
                skipped = "skipped: database unavailable"
                checks.setdefault("migrations", check("fail", skipped, time.monotonic()))
                checks.setdefault("job_queue", self._job_queue_check(None))
            checks["http_endpoint"] = self._http_check()
        if self.mode == "unhealthy":
            checks["database"] = check("fail", "forced by HEALTH_MODE=unhealthy", time.monotonic())
        states = {c["status"] for c in checks.values()}
        status = "unhealthy" if "fail" in states else "degraded" if "warn" in states else "healthy"
        body = {
            "status": status,
            "version": VERSION,
            "checks": checks,
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return (503 if status == "unhealthy" else 200), body

    def _migrations_check(self, conn: Any) -> dict[str, Any]:
        """Newest applied version (dbmate varchar or golang-migrate bigint) vs newest file."""
        started, expected = time.monotonic(), self.expected_version
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT version FROM schema_migrations ORDER BY version DESC LIMIT 1")
                row = cur.fetchone()
            actual = int(row[0]) if row else None
        except psycopg2.errors.UndefinedTable:
            return check(
                "fail", "schema_migrations table missing", started, expected_version=expected
            )
        except (psycopg2.Error, ValueError) as exc:
            return check("fail", describe_error(exc), started, expected_version=expected)
        versions = {"expected_version": expected, "actual_version": actual}
        if expected is not None and actual == expected:
            return check(
                "pass", f"Schema version matches expected: {expected}", started, **versions
            )
        if expected is not None and actual is not None and actual > expected \
                and self.mode != "schema-exact":
            # A rolled-back release runs on a schema migrated further by a newer one: with
            # expand/contract migrations that is the normal case, not an outage.
            message = f"Schema is ahead of this build: expected {expected}, actual {actual}"
            return check("pass", message, started, **versions)
        relation = "ahead of" if (actual or 0) > (expected or 0) else "behind"
        message = f"Schema version {relation} this build: expected {expected}, actual {actual}"
        return check("fail", message, started, **versions)

    def _job_queue_check(self, conn: Any) -> dict[str, Any]:
        """Worker heartbeat freshness, plus a warning for jobs that have waited too long."""
        started, last = time.monotonic(), self.worker.last_ok
        age = started - (last if last is not None else STARTED)  # startup allowance: 10 s
        details: dict[str, Any] = {
            "processed_total": self.worker.processed,
            "heartbeat_age_ms": None if last is None else round(age * 1000),
        }
        if age >= HEARTBEAT_MAX_AGE:
            message = f"job worker has not run successfully for {age:.0f}s"
            return check("fail", message, started, **details)
        if conn is not None:
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM jobs WHERE state = 'pending'"
                        " AND created_at < now() - interval '5 minutes'"
                    )
                    details["stale_pending_jobs"] = cur.fetchone()[0]
            except psycopg2.Error as exc:
                return check("fail", describe_error(exc), started, **details)
        if self.mode == "degraded":
            return check("warn", "forced by HEALTH_MODE=degraded", started, **details)
        if details.get("stale_pending_jobs"):
            return check("warn", "pending jobs older than 5 minutes", started, **details)
        message = "job worker starting" if last is None else "job worker alive"
        return check("pass", message, started, **details)

    def _http_check(self) -> dict[str, Any]:
        """A real request to our own ``GET /`` over loopback."""
        started = time.monotonic()
        remaining = SLOW_START_SECONDS - (started - STARTED)
        if self.mode == "slow" and remaining > 0:
            return check("fail", "starting up", started, ready_in_seconds=round(remaining))
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=1)
        try:
            conn.request("GET", "/")
            status = conn.getresponse().status
        except OSError as exc:
            return check("fail", describe_error(exc), started)
        finally:
            conn.close()
        if status == 200:
            return check("pass", "HTTP server responding", started)
        return check("fail", f"GET / returned HTTP {status}", started)


class Connections:
    """The open client connections, so that a stop closes the idle keep-alive ones at once (a
    proxy's pool, a client's kept socket) while the busy ones finish their request and are
    closed after its response. Everything here runs on the event loop's one thread."""

    def __init__(self) -> None:
        self.open: set[HttpConnection] = set()
        self.closing = False

    def close_idle(self) -> int:
        """From now on every connection closes after its response; the idle ones now. Returns
        how many were closed."""
        self.closing = True
        idle = [connection for connection in self.open if connection.idle]
        for connection in idle:
            connection.finish()
        return len(idle)

    def drop_expired(self, now: float) -> None:
        """Drop the connections that have waited longer than IDLE_KEEPALIVE_SECONDS for a
        complete request head (an idle keep-alive connection, a client that stalls mid-head)
        or for the client to read its responses."""
        for connection in [c for c in self.open if c.task is None and now > c.deadline]:
            connection.drop()


class Request:
    """What the answer depends on, parsed from one request head."""

    __slots__ = ("method", "path", "keep_alive", "body_length", "expect_continue")

    def __init__(self, method: str, path: str, keep_alive: bool, body_length: int,
                 expect_continue: bool) -> None:
        self.method = method
        self.path = path
        self.keep_alive = keep_alive
        self.body_length = body_length
        self.expect_continue = expect_continue


class BadRequest(Exception):
    """A request answered with an error page and a closed connection (http.server's send_error)."""

    def __init__(self, status: int, message: str | None = None, explain: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message or HTTPStatus(status).phrase
        self.explain = explain or HTTPStatus(status).description


def parse_head(head: bytes) -> Request:
    """The request line and the few headers that matter, with http.server's limits and error
    messages. Bodies are allowed (and skipped) up to MAX_BODY; a chunked one closes."""
    lines = head.decode("iso-8859-1").split("\n")
    request_line = lines[0].rstrip("\r")
    words = request_line.split()
    if len(words) != 3:
        raise BadRequest(400, f"Bad request syntax ({request_line!r})")
    method, target, version = words
    numbers = version[5:].split(".") if version.startswith("HTTP/") else []
    if len(numbers) != 2 or not all(n.isdigit() and len(n) <= 10 for n in numbers):
        raise BadRequest(400, f"Bad request version ({version!r})")
    number = (int(numbers[0]), int(numbers[1]))
    if number >= (2, 0):
        raise BadRequest(505, f"Invalid HTTP version ({version[5:]})")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(431, "Too many headers", f"got more than {MAX_HEADERS} headers")
    keep_alive = number >= (1, 1)
    body_length, expect_continue = 0, False
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or name[:1] in (" ", "\t"):
            continue  # http.server's parser skips these too
        name, value = name.strip().lower(), value.strip().lower()
        if name == "connection":
            tokens = {token.strip() for token in value.split(",")}
            keep_alive = "close" not in tokens and (keep_alive or "keep-alive" in tokens)
        elif name == "content-length":
            if not value.isdigit():
                raise BadRequest(400, f"Bad Content-Length ({value!r})")
            body_length = int(value)
            if body_length > MAX_BODY:
                raise BadRequest(413)
        elif name == "transfer-encoding":
            keep_alive = False  # the body's end is not looked for: answer, then close
        elif name == "expect":
            expect_continue = value == "100-continue" and number >= (1, 1)
    if target.startswith("//"):
        target = "/" + target.lstrip("/")  # as http.server does (gh-87389)
    return Request(method, target.split("?", 1)[0], keep_alive, body_length, expect_continue)


def oversized(head: bytes | bytearray) -> BadRequest:
    """The error for a head longer than MAX_HEAD, in http.server's words where it had some."""
    lines = head.split(b"\n")
    if len(lines[0]) > MAX_HEAD:
        return BadRequest(414)
    if any(len(line) > MAX_HEAD for line in lines):
        return BadRequest(431, "Line too long",
                          f"got more than {MAX_HEAD} bytes when reading header line")
    return BadRequest(431)


def find_head(buffer: bytearray) -> tuple[int, int]:
    """Where the request head in `buffer` ends (its first empty line, CRLF or bare LF) and where
    what follows it starts; (-1, -1) while it is incomplete."""
    crlf, lf = buffer.find(b"\n\r\n"), buffer.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 3
    return (lf, lf + 2) if lf >= 0 else (-1, -1)


_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    """The Date header's value, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def response(status: int, data: bytes, content_type: str, closing: bool) -> bytes:
    """Headers and body as one buffer, for one send."""
    close = "Connection: close\r\n" if closing else ""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nServer: {SERVER}\r\n"
            f"Date: {http_date()}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n{close}\r\n")
    return head.encode("latin-1") + data


def error_response(error: BadRequest, head_only: bool) -> bytes:
    """http.server's error page, with its reason phrase and ``Connection: close``."""
    body = DEFAULT_ERROR_MESSAGE % {
        "code": error.status,
        "message": html.escape(error.message, quote=False),
        "explain": html.escape(error.explain, quote=False),
    }
    data = body.encode("utf-8", "replace")
    head = (f"HTTP/1.1 {error.status} {error.message}\r\nServer: {SERVER}\r\n"
            f"Date: {http_date()}\r\nConnection: close\r\n"
            f"Content-Type: {DEFAULT_ERROR_CONTENT_TYPE}\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode("latin-1", "replace") + (b"" if head_only else data)


def json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


ROOT_BODY = json_bytes({"app": "togather-demo", "version": VERSION})
VERSION_BODY = json_bytes(
    {"version": VERSION, "git_commit": GIT_COMMIT, "build_timestamp": BUILD_TIMESTAMP}
)
NOT_FOUND_BODY = json_bytes({"error": "not found"})


class HttpConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 with keep-alive (the proxy keeps a pool of connections
    to each slot). Requests are answered in order; the cheap ones at once on the loop, /health
    in a task (its checks in the executor) while later pipelined requests wait in the buffer."""

    def __init__(self, app: App, executor: ThreadPoolExecutor) -> None:
        self.app = app
        self.executor = executor
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None  # the /health being answered
        self.skip = 0  # body bytes of the last request still to be read and dropped
        self.deadline = self.loop.time() + IDLE_KEEPALIVE_SECONDS
        self.writable = True
        self.reading = True
        self.eof = False  # the client has sent all it will send
        self.done = False  # closed, or closing after its last response

    @property
    def idle(self) -> bool:
        """Between two requests: nothing being answered, nothing of a request received."""
        return self.task is None and not self.buffer and not self.skip and not self.done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # One send per response anyway; without it a response that fills more than one
            # segment would wait for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.app.connections.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.app.connections.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None and self.writable:
            self.process()
        elif len(self.buffer) > MAX_HEAD and self.reading:
            self.reading = False  # a client pipelining faster than it reads its answers
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """The client is done sending: answer the requests it sent, then close."""
        self.eof = True
        if self.task is None and self.writable:
            self.process()
        return True

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.task is None:
            self.process()

    def process(self) -> None:
        """Answer the complete requests in the buffer, in order, until one needs a task."""
        while not self.done and self.task is None and self.writable:
            if self.skip:
                dropped = min(self.skip, len(self.buffer))
                del self.buffer[:dropped]
                self.skip -= dropped
                if self.skip:
                    return
            if self.buffer[:1] in (b"\r", b"\n"):
                del self.buffer[:len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))]
            end, rest = find_head(self.buffer)
            if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
                head = self.buffer[:end] if end > 0 else self.buffer
                self.reject(oversized(head), head_only=False)
                return
            if end < 0:
                if self.eof:
                    self.finish()
                elif not self.reading:
                    self.reading = True
                    self.transport.resume_reading()
                return
            head = bytes(self.buffer[:end])
            del self.buffer[:rest]
            self.handle(head)

    def handle(self, head: bytes) -> None:
        try:
            request = parse_head(head)
        except BadRequest as error:
            self.reject(error, head_only=False)
            return
        if request.method != "GET":
            error = BadRequest(501, f"Unsupported method ({request.method!r})")
            self.reject(error, head_only=request.method == "HEAD")
            return
        if request.expect_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.skip = request.body_length
        path = request.path
        if path == "/":
            self.respond(request, 200, ROOT_BODY)
        elif path == "/version":
            self.respond(request, 200, VERSION_BODY)
        elif path != "/health":
            self.respond(request, 404, NOT_FOUND_BODY)
        elif self.app.mode == "html":
            self.respond(request, 200, b"<html><body><h1>It works!</h1></body></html>",
                         "text/html")
        elif self.app.mode == "garbage":
            self.respond(request, 200, b'{"status": "healthy", "checks": ')
        else:
            self.task = self.loop.create_task(self.answer_health(request))

    async def answer_health(self, request: Request) -> None:
        """The health checks block (PostgreSQL, a request to ourselves): they run in the
        executor while the loop goes on serving."""
        self.app.in_flight += 1
        try:
            if self.app.mode == "hang":
                await asyncio.sleep(HANG_SECONDS)
                self.task = None
                self.finish()  # never answered, as a hung application would
                return
            status, body = await self.loop.run_in_executor(self.executor, self.app.health)
        except Exception as exc:  # a bug in the checks: an error page, not a dead connection
            log(f"/health failed: {describe_error(exc)}")
            self.task = None
            self.reject(BadRequest(500), head_only=False)
            return
        finally:
            self.app.in_flight -= 1
        if self.app.mode == "lying":
            status, body["status"] = 200, "unhealthy"
        self.task = None
        self.respond(request, status, json_bytes(body))
        self.process()

    def respond(self, request: Request, status: int, data: bytes,
                content_type: str = "application/json") -> None:
        if self.done:
            return  # the client went away while its answer was being made
        closing = self.app.connections.closing
        self.transport.write(response(status, data, content_type, closing))
        self.deadline = self.loop.time() + IDLE_KEEPALIVE_SECONDS  # to send it, or for the next
        if closing or not request.keep_alive:
            self.finish()

    def reject(self, error: BadRequest, head_only: bool) -> None:
        if not self.done:
            self.transport.write(error_response(error, head_only))
            self.finish()

    def finish(self) -> None:
        """Close after what has been written is sent; the rest of the buffer is dropped."""
        self.done = True
        self.transport.close()

    def drop(self) -> None:
        """Close now, even with unsent data (a client that does not read)."""
        self.done = True
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()


async def expire_idle_connections(connections: Connections) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        connections.drop_expired(loop.time())


async def serve(app: App) -> int:
    """Listen until SIGTERM or SIGINT, then stop gracefully within DRAIN_SECONDS."""
    loop = asyncio.get_running_loop()
    stopping: list[int] = []
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        stopping.append(signum)
        stop.set()

    # Explicit handlers: as PID 1 in a container the default dispositions don't apply.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    executor = ThreadPoolExecutor(max_workers=POOL_MAX, thread_name_prefix="health")
    try:
        server = await loop.create_server(
            lambda: HttpConnection(app, executor), "0.0.0.0", PORT,  # noqa: S104 (published)
            backlog=LISTEN_BACKLOG, reuse_address=True,
        )
    except OSError as exc:
        log(f"cannot listen on 0.0.0.0:{PORT}: {describe_error(exc)}; exiting")
        return 1
    app.worker.start()
    sweeper = loop.create_task(expire_idle_connections(app.connections))
    log(
        f"listening on 0.0.0.0:{PORT} version={VERSION} commit={GIT_COMMIT or '-'}"
        f" mode={app.mode} expected_schema={app.expected_version}"
    )
    await stop.wait()

    log(f"{signal.Signals(stopping[0]).name} received, shutting down")
    server.close()  # stop accepting; then let in-flight requests finish
    idle = app.connections.close_idle()
    log(f"closed {idle} idle connection(s); waiting for in-flight requests")
    deadline = loop.time() + DRAIN_SECONDS
    while app.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for connection in [c for c in app.connections.open if not c.done]:
        connection.drop()  # still busy after the deadline
    sweeper.cancel()
    app.worker.stop_event.set()
    await asyncio.to_thread(app.worker.join, 3)
    app.db.close()
    executor.shutdown(wait=False, cancel_futures=True)
    log("stopped")
    return 0


def main() -> int:
    mode = read_health_mode()
    if mode not in HEALTH_MODES:
        log(f"unknown HEALTH_MODE {mode!r} (expected one of {sorted(HEALTH_MODES)}); exiting")
        return 1
    if mode == "crash":
        log("HEALTH_MODE=crash: exiting on purpose before listening")
        return 1
    return asyncio.run(serve(App(mode)))


if __name__ == "__main__":
    sys.exit(main())
