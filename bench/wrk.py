"""Run Debian's `wrk` (keep-alive HTTP load, no retries: a closed connection is a socket
error) and read its summary. Shared by bench/edge_switch.py and bench/proxy_throughput.py.

wrk runs for a fixed duration, bounded here by a timeout; it is started in the background so
a deploy can run while it loads the proxy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass

WRK_TIMEOUT_MARGIN = 30.0
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


class WrkMissing(Exception):
    """wrk is not installed (`apt-get install wrk`; `make bench` installs it)."""


@dataclass
class WrkResult:
    requests: int
    rps: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    non_2xx: int
    p50_ms: float
    p99_ms: float
    output: str

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    def errors_text(self) -> str:
        return (f"connect {self.connect_errors}, read {self.read_errors}, "
                f"write {self.write_errors}, timeout {self.timeouts}")


def parse(output: str) -> WrkResult:
    requests = _REQUESTS.search(output)
    rps = _RPS.search(output)
    if not requests or not rps:
        raise ValueError("not a wrk summary:\n" + output[-800:])
    sockets = _SOCKET.search(output)
    errors = [int(x) for x in sockets.groups()] if sockets else [0, 0, 0, 0]
    non2xx = _NON2XX.search(output)
    latency = {pct: float(value) * _UNIT_MS[unit]
               for pct, value, unit in _LATENCY.findall(output)}
    return WrkResult(int(requests.group(1)), float(rps.group(1)), *errors,
                     int(non2xx.group(1)) if non2xx else 0,
                     round(latency.get("50", 0.0), 2), round(latency.get("99", 0.0), 2),
                     output)


class Wrk:
    """`wrk -t THREADS -c CONNECTIONS -d SECONDS --latency URL` in the background."""

    def __init__(self, url: str, seconds: float, *, threads: int = 2,
                 connections: int = 16) -> None:
        binary = shutil.which("wrk")
        if binary is None:
            raise WrkMissing("wrk is not installed: apt-get install -y wrk")
        self.seconds = max(1, int(seconds))
        self.argv = [binary, "-t", str(threads), "-c", str(connections), "-d",
                     f"{self.seconds}s", "--latency", url]
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> Wrk:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        return self

    @property
    def ends_at(self) -> float:
        return self.started + self.seconds

    def result(self) -> WrkResult:
        assert self.proc is not None
        try:
            output, _ = self.proc.communicate(timeout=self.seconds + WRK_TIMEOUT_MARGIN)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        return parse(output)


def run(url: str, seconds: float, *, threads: int = 2, connections: int = 16) -> WrkResult:
    return Wrk(url, seconds, threads=threads, connections=connections).start().result()
