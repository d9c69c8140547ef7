"""Togather demo server: a tiny stand-in for the real Togather API, used to exercise deployments.

It is deliberately small but honest: ``GET /health`` really queries PostgreSQL, compares the
applied schema version with the migrations baked into the image, checks that a background job
worker is alive and makes a real HTTP request to the server itself. A broken deployment therefore
shows up as a failing health gate, exactly as it would with the real application.

Environment: PORT (8080), DATABASE_URL, VERSION, GIT_COMMIT, BUILD_TIMESTAMP, MIGRATIONS_DIR
(/app/migrations), HEALTH_MODE_FILE (/app/HEALTH_MODE), SLOW_START_SECONDS (30).
"""

from __future__ import annotations

import contextlib
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
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
        self.in_flight = 0
        self.in_flight_lock = threading.Condition()
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
    """The open client connections and whether each is between two requests, so that a stop
    closes the idle keep-alive ones at once (a proxy's pool, a client's kept socket) while
    the busy ones finish their request and are closed after its response."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[socket.socket, bool] = {}
        self.closing = False

    def opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle[sock] = True

    def busy(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle[sock] = False

    def idle(self, sock: socket.socket) -> bool:
        """Mark `sock` idle; True when it must be closed instead (the server is stopping)."""
        with self._lock:
            self._idle[sock] = True
            return self.closing

    def closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.pop(sock, None)

    def close_idle(self) -> int:
        """From now on every connection closes after its response; the idle ones now (the
        handler's blocked read returns end-of-file). Returns how many were closed."""
        with self._lock:
            self.closing = True
            idle = [sock for sock, is_idle in self._idle.items() if is_idle]
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(idle)


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive (the proxy keeps a pool of connections to each slot); a stop
    closes idle connections and lets busy ones finish (see Connections)."""

    app: App
    protocol_version = "HTTP/1.1"
    timeout = IDLE_KEEPALIVE_SECONDS  # an idle or slow client is dropped after this
    # Headers and body are two writes: with Nagle's algorithm the body waits for the peer's
    # delayed ACK (40 ms per request on a kept connection).
    disable_nagle_algorithm = True
    server_version = "togather-demo"

    def setup(self) -> None:
        super().setup()
        self.app.connections.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.app.connections.closed(self.connection)

    def parse_request(self) -> bool:
        self.app.connections.busy(self.connection)
        return super().parse_request()

    def do_GET(self) -> None:
        with self.app.in_flight_lock:
            self.app.in_flight += 1
        try:
            path = self.path.split("?", 1)[0]
            if path == "/":
                self.send_json(200, {"app": "togather-demo", "version": VERSION})
            elif path == "/version":
                self.send_json(
                    200,
                    {
                        "version": VERSION,
                        "git_commit": GIT_COMMIT,
                        "build_timestamp": BUILD_TIMESTAMP,
                    },
                )
            elif path == "/health":
                self.send_health()
            else:
                self.send_json(404, {"error": "not found"})
        finally:
            if self.app.connections.idle(self.connection):
                self.close_connection = True
            with self.app.in_flight_lock:
                self.app.in_flight -= 1
                self.app.in_flight_lock.notify_all()

    def send_health(self) -> None:
        mode = self.app.mode
        if mode == "html":
            self.send_body(200, b"<html><body><h1>It works!</h1></body></html>", "text/html")
        elif mode == "garbage":
            self.send_body(200, b'{"status": "healthy", "checks": ', "application/json")
        elif mode == "lying":
            status, body = self.app.health()
            body["status"] = "unhealthy"
            self.send_json(200, body)
        elif mode == "hang":
            time.sleep(HANG_SECONDS)
        else:
            self.send_json(*self.app.health())

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        self.send_body(status, json.dumps(body).encode(), "application/json")

    def send_body(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self.app.connections.closing:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: load tests send thousands of requests."""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # shutdown drains in-flight requests itself, with a deadline
    request_queue_size = 128


def main() -> int:
    mode = read_health_mode()
    if mode not in HEALTH_MODES:
        log(f"unknown HEALTH_MODE {mode!r} (expected one of {sorted(HEALTH_MODES)}); exiting")
        return 1
    if mode == "crash":
        log("HEALTH_MODE=crash: exiting on purpose before listening")
        return 1
    # Explicit handlers: as PID 1 in a container the default dispositions don't apply. The
    # handler only flips a flag (taking locks inside a signal handler could deadlock).
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda sig, _frame: stopping.append(sig))

    app = App(mode)
    Handler.app = app
    server = Server(("0.0.0.0", PORT), Handler)  # noqa: S104 (the container's published port)
    app.worker.start()
    threading.Thread(target=server.serve_forever, args=(0.2,), name="http", daemon=True).start()
    log(
        f"listening on 0.0.0.0:{PORT} version={VERSION} commit={GIT_COMMIT or '-'}"
        f" mode={mode} expected_schema={app.expected_version}"
    )
    while not stopping:
        time.sleep(0.2)

    log(f"{signal.Signals(stopping[0]).name} received, shutting down")
    server.shutdown()  # stop accepting; then let in-flight requests finish
    server.server_close()
    idle = app.connections.close_idle()
    log(f"closed {idle} idle connection(s); waiting for in-flight requests")
    with app.in_flight_lock:
        app.in_flight_lock.wait_for(lambda: app.in_flight == 0, timeout=DRAIN_SECONDS)
    app.worker.stop_event.set()
    app.worker.join(timeout=3)
    app.db.close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
