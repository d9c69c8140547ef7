"""Sustained throughput through the proxy vs straight to the active slot (issue 10), HTTP and
HTTPS side by side in one run on the staging test bed.

A throwaway copy of examples/demo is deployed with `proxy.tls` (a self-signed certificate
generated into the bench's temporary directory, bench/tls_app.py; plain HTTP keeps serving the
app); then wrk (keep-alive; over HTTPS each connection's handshake happens once) runs for
--seconds each, in this order: direct to the active slot's published port (what the issue
measured: Docker's userland forwarder, docker-proxy, relays it), straight to the slot's address
on its edge network (the app alone, no forwarder: togather_tasks/edge.py), through the proxy
over HTTP, again right after, through the proxy over HTTPS, again right after, both direct
runs again. The proxy reaches the slot on the edge network too. After each
run it counts the sockets in TIME_WAIT in the proxy's network namespace (`ss -tan state
time-wait`, entered through the proxy container's pid): a proxy that opened a new upstream
connection per request piled up ~14,000 of them and lost two thirds of its throughput (issue
10). Goal: through the proxy >= 90 % of direct, every run, and no TIME_WAIT pile-up. About six
and a half minutes with the default 60 s, then direct, proxy HTTP and proxy HTTPS again with
--many (256) connections for --many-seconds (20) each: more clients at once than a small
upstream pool holds (with nginx's pool of 32 per worker, 128 connections collapsed to 1,206
req/s with ~20,000 sockets in TIME_WAIT; proxy.keepalive is 1024 now). About eight minutes
in all.

    .venv/bin/python bench/proxy_throughput.py [--seconds 60] [--connections 16] [--threads 1]
                                               [--scheme both|http|https]
                                               [--many 256] [--many-seconds 20] [--haproxy]
                                               [--engine haproxy|nginx]

--engine: the deployed app's proxy.engine, by default the product's (haproxy).

--haproxy adds two runs: Debian's HAProxy (2.6, OpenSSL 3.0 like nginx) started beside the
proxy in front of the same slot, doing to each request what togather-app.conf does, over HTTP
and HTTPS; a comparison for the choice of proxy, not part of the product.

wrk runs one thread by default: on a 2-core machine a second wrk thread takes CPU from the
proxy and the app being measured (the proxy side needs more CPU than the direct side, so a
greedy load generator penalises it). Run as root; loopback only; every run bounded. The
machine is shared: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import wrk
from tls_app import TlsBenchApp
from zero_downtime import ENV, BenchApp, SetupError, free_ports, must, preflight, terminate_as_exit

from togather_tasks import edge

GOAL = 0.90
HAPROXY_START_SECONDS = 10.0

# --haproxy: Debian's HAProxy beside the proxy, in front of the same slot, doing what nginx's
# togather-app.conf does to each request and response (the forwarded headers, the
# verification header dropped, the slot header added), one thread like nginx's one worker.
# For comparison only: it has no switch, no maintenance page, no ACME.
HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 65s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend edge
    bind 127.0.0.1:{http_port}
    bind 127.0.0.1:{https_port} ssl crt {pem}
    option forwardfor
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request del-header X-Togather-Verify
    http-response set-header X-Togather-Slot {slot}
    default_backend slot
backend slot
    server {slot} {address}:8080
"""


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def service_pid(app: BenchApp, service: str) -> str:
    """The host pid of a service's container's main process."""
    ids = must(app.compose("ps", "--quiet", service, timeout=60), "compose ps").output.split()
    if not ids:
        raise SetupError(f"{service} is not running")
    out = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}} "
                          "{{.HostConfig.NetworkMode}}", ids[0]], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    return out[0]


def proxy_pid(app: BenchApp) -> str:
    return service_pid(app, "proxy")


def children(pid: str) -> list[str]:
    return subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True,
                          timeout=30).stdout.split()


def cpu_seconds(pids: list[str]) -> float:
    """User + system CPU time of these processes (not their children), from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(all CPU time, busy CPU time) of the machine so far, seconds, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    every = sum(values[:8]) / os.sysconf("SC_CLK_TCK")
    return every, every - (values[3] + values[4]) / os.sysconf("SC_CLK_TCK")


def docker_proxy_pids(port: int) -> list[str]:
    """Docker's userland forwarder for a published port (none when the daemon runs without
    it)."""
    return subprocess.run(["pgrep", "-f", f"docker-proxy .*-host-port {port} "],
                          capture_output=True, text=True, timeout=30).stdout.split()


def time_wait(pid: str, ports: tuple[int, ...]) -> tuple[int, int]:
    """(all TIME_WAIT sockets, those to or from `ports`) in the network namespace of `pid`."""
    def count(*condition: str) -> int:
        out = subprocess.run(["nsenter", "-t", pid, "-n", "ss", "-Htan", "state", "time-wait",
                              *condition], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        return len(out.splitlines())

    ours = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    return count(), count(f"( {ours} )")


@contextlib.contextmanager
def haproxy_beside(app: BenchApp, active: str) -> Iterator[tuple[list[str], int, int]]:
    """HAProxy in the foreground in front of the active slot's edge address, with the bench's
    self-signed certificate: ([its pid], HTTP port, HTTPS port); stopped on the way out."""
    if not shutil.which("haproxy"):
        raise SetupError("--haproxy needs Debian's haproxy (the fleet test bed installs it)")
    workdir = app.workdir / "haproxy"
    workdir.mkdir()
    pem = workdir / "site.pem"
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write((app.tls_dir / "site.crt").read_bytes() + (app.tls_dir / "site.key").read_bytes())
    http_port, https_port = free_ports(2)
    address = edge.slot_address(edge.derived_subnet(app.ports["blue"]), active)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(http_port=http_port, https_port=https_port, pem=pem,
                                      slot=active, address=address))
    process = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HAPROXY_START_SECONDS
        while True:
            if process.poll() is not None:
                raise SetupError(f"haproxy exited: {process.stderr.read()[-500:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", https_port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SetupError(f"haproxy did not listen within {HAPROXY_START_SECONDS:g} s")
            time.sleep(0.1)
        yield [str(process.pid)], http_port, https_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def plan(app: BenchApp, active: str, args: argparse.Namespace,
         haproxy: tuple[int, int] | None = None) -> list[tuple[str, str, int, float]]:
    """(label, url, connections, seconds) of each wrk run, in order: the sustained runs, then
    the many-clients runs (--many connections: more than a small upstream pool holds)."""
    scheme = args.scheme
    direct = f"http://127.0.0.1:{app.ports[active]}/version"
    address = edge.slot_address(edge.derived_subnet(app.ports["blue"]), active)
    runs = [(f"direct to app-{active}", direct),
            (f"app-{active} at {address}", f"http://{address}:8080/version")]
    if scheme in ("both", "http"):
        http = f"http://127.0.0.1:{app.ports['proxy']}/version"
        runs += [("proxy HTTP", http), ("proxy HTTP, again", http)]
    if scheme in ("both", "https"):
        https = f"https://127.0.0.1:{app.ports['https']}/version"
        runs += [("proxy HTTPS", https), ("proxy HTTPS, again", https)]
    if haproxy:
        runs += [("haproxy HTTP", f"http://127.0.0.1:{haproxy[0]}/version"),
                 ("haproxy HTTPS", f"https://127.0.0.1:{haproxy[1]}/version")]
    runs += [(f"direct to app-{active}, again", direct),
             (f"app-{active} at {address}, again", f"http://{address}:8080/version")]
    sustained = [(label, url, args.connections, args.seconds) for label, url in runs]
    if not args.many:
        return sustained
    many = [(f"{label}, {args.many} conns", url, args.many, args.many_seconds)
            for label, url in runs[:1] + [run for run in runs if run[0] in (
                "proxy HTTP", "proxy HTTPS")]]
    return sustained + many


def row_line(label: str, r: wrk.WrkResult, best: float, avg: float,
             waiting: tuple[int, int], before: str, after: str) -> str:
    """One run's line of a results table (header in measure)."""
    return (f"{label:<34}{r.rps:>8.0f}{best:>8.0%}{avg:>8.0%}{r.p50_ms:>8.1f}"
            f"{r.p99_ms:>8.1f}{r.socket_errors:>7}{r.non_2xx:>8}"
            f"{f'{waiting[0]}/{waiting[1]}':>19}  {before} -> {after}")


def benchmark(app: BenchApp, args: argparse.Namespace) -> list[str]:
    must(app.inv("deploy", f"--env={ENV}"), "deploy")
    active = app.status()["active_slot"]
    if not args.haproxy:
        return measure(app, args, active, [], None)
    with haproxy_beside(app, active) as (haproxy_pids, http_port, https_port):
        return measure(app, args, active, haproxy_pids, (http_port, https_port))


def measure(app: BenchApp, args: argparse.Namespace, active: str, haproxy_pids: list[str],
            haproxy: tuple[int, int] | None) -> list[str]:
    def say(text: str) -> None:
        print(text, flush=True)

    pid = proxy_pid(app)
    # The proxy column: the proxy's processes (HAProxy's master and worker, or nginx's master
    # and workers with --engine nginx), and HAProxy beside it in --haproxy's runs (the other
    # one is idle then).
    proxy_processes = [pid, *children(pid), *haproxy_pids]
    app_pids = [service_pid(app, f"app-{active}")]
    ports = tuple(app.ports[name] for name in ("proxy", "https", "blue", "green")
                  if name in app.ports)
    forwarder = docker_proxy_pids(app.ports[active])
    rows = []
    for label, url, connections, seconds in plan(app, active, args, haproxy):
        before = load_average()
        say(f"{label}: wrk {seconds:g} s, {args.threads} thread(s), {connections} "
            f"connections (load average {before}) ...")
        def sample() -> tuple[float, ...]:
            spent = resource.getrusage(resource.RUSAGE_CHILDREN)
            return (cpu_seconds(proxy_processes), cpu_seconds(app_pids), cpu_seconds(forwarder),
                    spent.ru_utime + spent.ru_stime)

        cpu0, machine0 = sample(), machine_busy()
        result = wrk.run(url, seconds, threads=args.threads, connections=connections)
        cpu1, machine1 = sample(), machine_busy()
        thousands = max(result.requests, 1) / 1000
        cost = (*((after - before) * 1000 / thousands for before, after in zip(cpu0, cpu1,
                                                                             strict=True)),
                (machine1[1] - machine0[1]) / max(machine1[0] - machine0[0], 1e-9))
        waiting = time_wait(pid, ports)
        rows.append((label, result, waiting, before, load_average(), cost))

    sustained = [row for row in rows if " conns" not in row[0]]
    many = [row for row in rows if " conns" in row[0]]
    rows = sustained
    direct_rps = [r.rps for label, r, *_ in rows if label.startswith("direct")]
    header = (f"{'run':<34}{'req/s':>8}{'vs best':>8}{'vs mean':>8}{'p50 ms':>8}{'p99 ms':>8}"
              f"{'errors':>7}{'non-2xx':>8}{'TIME_WAIT all/ours':>19}  load before -> after")
    reference, mean = max(direct_rps), sum(direct_rps) / len(direct_rps)
    out = ["", f"wrk {args.threads} thread(s), {args.connections} connections, "
               f"{args.seconds:g} s each; {os.cpu_count()} CPUs", header]
    ratios = []
    for label, r, (all_tw, ours), before, after, _ in rows:
        best, avg = r.rps / reference, r.rps / mean
        if label.startswith("proxy"):
            ratios.append((label, best))
        out.append(row_line(label, r, best, avg, (all_tw, ours), before, after))
    out += ["", f"CPU per 1,000 requests (ms): the proxy ({app.engine}; HAProxy beside it in "
            "--haproxy's runs), the app's process, docker-proxy "
            "(the published port's forwarder), wrk (the load generator, on the same CPUs), and "
            "how busy the whole machine was (all processes, the other users' included):"]
    for label, _, _, _, _, (proxy_ms, app_ms, forwarder_ms, wrk_ms, busy) in rows:
        out.append(f"  {label:<34}proxy {proxy_ms:5.1f}  app {app_ms:5.1f}  docker-proxy "
                   f"{forwarder_ms:5.1f}  wrk {wrk_ms:5.1f}  machine busy {busy:4.0%}")
    piled = max(ours for _, _, (_, ours), *_ in rows)
    worst = min(ratio for _, ratio in ratios)
    raw = max(r.rps for label, r, *_ in rows if label.startswith("app-"))
    out += ["", "through the proxy / best direct run (the slot's published port): "
            + ", ".join(f"{label} {ratio:.0%}" for label, ratio in ratios),
            "through the proxy / best run straight to the slot's edge address (no "
            "forwarder at all): " + ", ".join(f"{label} {r.rps / raw:.0%}"
                                             for label, r, *_ in rows
                                             if label.startswith("proxy")),
            f"goal >= {GOAL:.0%} every proxy run: {'PASS' if worst >= GOAL else 'FAIL'}",
            *(["HAProxy beside nginx, same slot and headers (not the product; --haproxy): "
               + ", ".join(f"{label} {r.rps / reference:.0%}" for label, r, *_ in rows
                           if label.startswith("haproxy"))] if haproxy else []),
            f"TIME_WAIT to the proxy's and slots' ports after any run: {piled} "
            f"({'no pile-up' if piled < 1000 else 'PILE-UP'}; main had ~14,000)",
            "before (main, issue 10): direct ~2,040 req/s; through the proxy four 8 s runs "
            "1,880, 1,380, 700, 660 req/s"]
    if many:
        out += ["", f"Many clients: {args.many} connections, {args.many_seconds:g} s each "
                "(more than an upstream pool of 32 per worker held: 1,206 req/s and ~20,000 "
                "TIME_WAIT at 128 connections before proxy.keepalive went to 1024)", header]
        # Against the direct run with as many connections (vs best, vs mean: the same one).
        same = max([r.rps for label, r, *_ in many if label.startswith("direct")] or [mean])
        out += [row_line(label, r, r.rps / same, r.rps / same, waiting, before, after)
                for label, r, waiting, before, after, _ in many]
        piled_many = max(ours for _, _, (_, ours), *_ in many)
        out.append(f"TIME_WAIT to the proxy's and slots' ports after a many-clients run: "
                   f"{piled_many} ({'no pile-up' if piled_many < 1000 else 'PILE-UP'})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--many", type=int, default=256,
                        help="connections of the many-clients runs (0: none)")
    parser.add_argument("--many-seconds", type=float, default=20.0)
    parser.add_argument("--haproxy", action="store_true",
                        help="also run Debian's HAProxy beside nginx in front of the same "
                             "slot, HTTP and HTTPS (a comparison, not the product)")
    parser.add_argument("--scheme", choices=("both", "http", "https"), default="both",
                        help="which side(s) of the proxy to load")
    parser.add_argument("--engine", choices=("haproxy", "nginx"), default="haproxy",
                        help="proxy.engine of the deployed app (default: the product's)")
    args = parser.parse_args(argv)
    if args.haproxy and args.scheme == "http":
        parser.error("--haproxy needs the HTTPS bench app (--scheme both or https)")
    args.seconds = max(5.0, min(args.seconds, 300.0))
    args.connections = max(1, min(args.connections, 1024))
    args.many = max(0, min(args.many, 1024))
    args.many_seconds = max(5.0, min(args.many_seconds, 300.0))
    args.threads = max(1, min(args.threads, args.connections, 8))
    try:
        preflight()
        wrk.Wrk("http://127.0.0.1/", 1)
    except (SetupError, wrk.WrkMissing) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    kind = BenchApp if args.scheme == "http" else TlsBenchApp
    app = kind(Path(tempfile.mkdtemp(prefix="togather-bench-")), engine=args.engine)
    lines: list[str] = []
    try:
        with terminate_as_exit():
            app.setup()
            lines = benchmark(app, args)
    except SetupError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        for command in app.cleanup():
            print(f"bench: left behind, remove with: {command}", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
