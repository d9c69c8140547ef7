"""A bounded keep-alive HTTP load generator for loopback targets, to measure zero downtime.

N worker threads, each with its own persistent `http.client.HTTPConnection`, send GET requests
to 127.0.0.1:PORT until a stop event, a request cap or a time cap, whichever comes first: every
run ends by itself (hard caps below apply whatever the caller asks).

What counts as failed: a request that got no 2xx answer even after one retry on a fresh
connection. The retry follows what browsers and urllib3 do with an idempotent request whose
connection was closed before any response arrived: a graceful nginx reload closes idle
keep-alive connections, and a request raced into such a connection sees it closed (TESTBED.md).
Only connection-level errors (no HTTP response at all) are retried; an HTTP error status is an
answer and is final. Retries are reported separately.

Each response's `X-Togather-Slot` header and the `version` of its JSON body are counted per
second of the run, so a table of them shows when traffic moved from one slot to the other.

    python bench/loadgen.py --port 9080 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

HARD_MAX_REQUESTS = 2_000_000
HARD_MAX_SECONDS = 600.0
HARD_MAX_WORKERS = 256
DEFAULT_MAX_REQUESTS = 1_000_000
DEFAULT_MAX_SECONDS = 120.0
REQUEST_TIMEOUT = 5.0

T = TypeVar("T")


def loopback_host(host: str) -> str:
    """The target as an IP literal; anything that is not loopback is refused."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"refusing {host!r}: only loopback IP addresses are allowed") from None
    if not address.is_loopback:
        raise ValueError(f"refusing {host}: only loopback targets are allowed")
    return str(address)


@dataclass
class LoadResult:
    """Totals of one run. `sent` counts requests, not attempts: a retried request counts once
    in `sent` and once in `retried`. failed == conn_errors + non_2xx."""

    sent: int
    ok: int
    failed: int
    retried: int
    conn_errors: int
    non_2xx: int
    p50_ms: float
    p99_ms: float
    rps: float
    duration_s: float
    # (second since start, {"slot/version": responses}) for every second with a response.
    slots_seen: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    # "slot/version" -> seconds from the start of the run to its first 2xx response.
    first_seen_s: dict[str, float] = field(default_factory=dict)
    # Why attempts failed: exception class or "HTTP 502" -> count (retried ones included).
    retry_reasons: dict[str, int] = field(default_factory=dict)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""
    started_monotonic: float = 0.0

    def timeline(self) -> str:
        """One line per second in which the mix of slots/versions changed, plus the first and
        last second: enough to see the switch moment."""
        lines, previous = [], None
        for i, (second, labels) in enumerate(self.slots_seen):
            keys = tuple(sorted(labels))
            if keys != previous or i == len(self.slots_seen) - 1:
                mix = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items()))
                lines.append(f"  t={second:>3}s  {mix}")
            previous = keys
        return "\n".join(lines)


@dataclass
class _WorkerStats:
    ok: int = 0
    retried: int = 0
    conn_errors: int = 0
    non_2xx: int = 0
    latencies: list[float] = field(default_factory=list)
    per_second: dict[int, Counter] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    retry_reasons: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)


class _NoResponse(Exception):
    """An attempt that got no HTTP response (connection refused, reset, closed, timed out)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.kind = type(cause).__name__


class LoadGenerator:
    """Keep-alive GET load on one loopback port. start(), then stop() or wait(); result()."""

    def __init__(self, port: int, path: str = "/", workers: int = 16, *,
                 max_requests: int = DEFAULT_MAX_REQUESTS,
                 max_seconds: float = DEFAULT_MAX_SECONDS, host: str = "127.0.0.1",
                 timeout: float = REQUEST_TIMEOUT, retries: int = 1) -> None:
        if not 0 < int(port) < 65536:
            raise ValueError(f"invalid port {port}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', not {path!r}")
        self.host = loopback_host(host)
        self.port = int(port)
        self.path = path
        self.workers = max(1, min(int(workers), HARD_MAX_WORKERS))
        self.max_requests = max(1, min(int(max_requests), HARD_MAX_REQUESTS))
        self.max_seconds = max(0.1, min(float(max_seconds), HARD_MAX_SECONDS))
        self.timeout = min(float(timeout), 30.0)
        # Retries on a fresh connection after an attempt that got no response: 1 is what
        # browsers and `requests` do; 0 counts every such attempt as a failure.
        self.retries = max(0, min(int(retries), 1))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._issued = 0
        self._threads: list[threading.Thread] = []
        self._stats: list[_WorkerStats] = []
        self._t0 = 0.0
        self._t_end: float | None = None
        self._stop_reason = ""

    # -- control -------------------------------------------------------------------------------

    def start(self) -> LoadGenerator:
        if self._threads:
            raise RuntimeError("a LoadGenerator runs once")
        self._t0 = time.monotonic()
        for i in range(self.workers):
            stats = _WorkerStats()
            self._stats.append(stats)
            thread = threading.Thread(target=self._work, args=(stats,), name=f"load-{i}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    @property
    def sent(self) -> int:
        """Requests started so far (live)."""
        return self._issued

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end by itself (a cap); True when it has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.running

    def stop(self) -> None:
        """Ask the workers to finish their current request and end; idempotent."""
        if not self._stop_reason:
            self._stop_reason = "stopped"
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout * 2 + 5)

    def result(self) -> LoadResult:
        """Stop the run if it is still going and return its totals."""
        self.stop()
        end = self._t_end or time.monotonic()
        duration = max(end - self._t0, 1e-9)
        latencies: list[float] = []
        per_second: dict[int, Counter] = {}
        first_seen: dict[str, float] = {}
        retry_reasons: Counter = Counter()
        failure_reasons: Counter = Counter()
        ok = retried = conn_errors = non_2xx = 0
        for s in self._stats:
            ok += s.ok
            retried += s.retried
            conn_errors += s.conn_errors
            non_2xx += s.non_2xx
            latencies.extend(s.latencies)
            for second, labels in s.per_second.items():
                per_second.setdefault(second, Counter()).update(labels)
            for label, at in s.first_seen.items():
                first_seen[label] = min(at, first_seen.get(label, at))
            retry_reasons.update(s.retry_reasons)
            failure_reasons.update(s.failure_reasons)
        latencies.sort()
        failed = conn_errors + non_2xx
        return LoadResult(
            sent=ok + failed, ok=ok, failed=failed, retried=retried, conn_errors=conn_errors,
            non_2xx=non_2xx, p50_ms=_percentile(latencies, 50), p99_ms=_percentile(latencies, 99),
            rps=round((ok + failed) / duration, 1), duration_s=round(duration, 3),
            slots_seen=[(sec, dict(per_second[sec])) for sec in sorted(per_second)],
            first_seen_s={k: round(v - self._t0, 3) for k, v in sorted(first_seen.items())},
            retry_reasons=dict(retry_reasons), failure_reasons=dict(failure_reasons),
            stop_reason=self._stop_reason, started_monotonic=self._t0)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- workers -------------------------------------------------------------------------------

    def _claim(self) -> bool:
        """One more request may start: no stop asked, under both caps."""
        with self._lock:
            if self._stop.is_set():
                return False
            if self._issued >= self.max_requests:
                self._end("max_requests")
                return False
            if time.monotonic() - self._t0 >= self.max_seconds:
                self._end("max_seconds")
                return False
            self._issued += 1
            return True

    def _end(self, reason: str) -> None:
        if not self._stop_reason:
            self._stop_reason = reason
        self._stop.set()

    def _work(self, stats: _WorkerStats) -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while self._claim():
                conn = self._one_request(conn, stats)
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                self._t_end = max(self._t_end or 0.0, time.monotonic())

    def _one_request(self, conn: http.client.HTTPConnection | None,
                     stats: _WorkerStats) -> http.client.HTTPConnection | None:
        """One request, retried once on a fresh connection if the first attempt got no
        response. Returns the connection to keep using (None when it was closed)."""
        for attempt in range(1, self.retries + 2):
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.monotonic()
            try:
                status, slot, version = self._attempt(conn)
            except _NoResponse as exc:
                conn.close()
                conn = None
                if attempt <= self.retries:
                    stats.retried += 1
                    stats.retry_reasons[exc.kind] += 1
                    continue
                stats.conn_errors += 1
                stats.failure_reasons[exc.kind] += 1
                return None
            done = time.monotonic()
            if 200 <= status < 300:
                stats.ok += 1
                stats.latencies.append((done - started) * 1000.0)
                label = f"{slot or '-'}/{version or '-'}"
                stats.per_second.setdefault(int(done - self._t0), Counter())[label] += 1
                stats.first_seen.setdefault(label, done)
            else:
                stats.non_2xx += 1
                stats.failure_reasons[f"HTTP {status}"] += 1
            return conn
        return conn

    def _attempt(self, conn: http.client.HTTPConnection) -> tuple[int, str, str]:
        try:
            conn.request("GET", self.path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _NoResponse(exc) from exc
        slot = resp.getheader("X-Togather-Slot", "") or ""
        version = ""
        if body[:1] == b"{":
            try:
                version = str(json.loads(body).get("version", ""))
            except (ValueError, AttributeError):
                version = ""
        if resp.will_close:
            conn.close()
        return resp.status, slot, version


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.5)))
    return round(sorted_values[rank - 1], 2)


def run_during(action: Callable[[], T], min_requests: int, *, port: int, path: str = "/",
               workers: int = 16, max_seconds: float = DEFAULT_MAX_SECONDS,
               max_requests: int = DEFAULT_MAX_REQUESTS, warmup_s: float = 1.0,
               host: str = "127.0.0.1", retries: int = 1) -> tuple[LoadResult, T, float]:
    """Start the load, wait `warmup_s`, run `action` (e.g. a subprocess `inv deploy`), keep the
    load until the action has returned AND at least `min_requests` were sent (or a cap ends the
    run), then stop. Returns (load result, action's return value, action's wall time in s).
    If the action raises, the load is stopped and the exception propagates."""
    gen = LoadGenerator(port, path, workers, max_requests=max_requests,
                        max_seconds=max_seconds, host=host, retries=retries)
    gen.start()
    try:
        time.sleep(min(warmup_s, gen.max_seconds / 2))
        started = time.monotonic()
        value = action()
        wall = time.monotonic() - started
        while gen.running and gen.sent < min_requests:
            time.sleep(0.05)
    finally:
        result = gen.result()
    return result, value, wall


def _format(result: LoadResult) -> str:
    lines = [f"sent {result.sent}  ok {result.ok}  failed {result.failed}  retried "
             f"{result.retried}  conn_errors {result.conn_errors}  non_2xx {result.non_2xx}",
             f"p50 {result.p50_ms} ms  p99 {result.p99_ms} ms  {result.rps} req/s  "
             f"{result.duration_s} s  (ended: {result.stop_reason})"]
    if result.retry_reasons:
        lines.append(f"retried because: {result.retry_reasons}")
    if result.failure_reasons:
        lines.append(f"failed because: {result.failure_reasons}")
    if result.slots_seen:
        lines.append("slot/version per second:\n" + result.timeline())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--path", default="/")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=DEFAULT_MAX_REQUESTS,
                        help=f"stop after this many requests (at most {HARD_MAX_REQUESTS})")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help=f"stop after this many seconds (at most {HARD_MAX_SECONDS:.0f})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        gen = LoadGenerator(args.port, args.path, args.workers, max_requests=args.requests,
                            max_seconds=args.seconds, host=args.host)
    except ValueError as exc:
        parser.error(str(exc))
    gen.start()
    with contextlib.suppress(KeyboardInterrupt):
        gen.wait()
    result = gen.result()
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        print(_format(result))
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
