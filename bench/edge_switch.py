"""The switch without a reload, measured (issue 10): keep-alive load that never retries, through
the proxy of a throwaway copy of examples/demo on the staging test bed, during a deploy and
during a rollback.

  wrk   (Debian's wrk: a connection closed under it is a socket error, never retried)
        during `inv deploy` (v1 -> v2) and `inv rollback` (v2 -> v1);
  loadgen (bench/loadgen.py with --retries 0: an attempt without a response is a failure)
        during `inv deploy` (v1 -> v3) and `inv rollback` (v3 -> v1).

Goal: 0 socket errors and 0 non-2xx in every phase. Printed next to the figures measured with
the graceful-reload switch it replaced and the in-place baseline. About two minutes.

    .venv/bin/python bench/edge_switch.py [--scheme http] [--wrk-seconds 40] [--connections 16]
                                          [--threads 1] [--engine haproxy|nginx]

`--scheme https` gives the throwaway app `proxy.tls` with a self-signed certificate generated
into the bench's temporary directory (bench/tls_app.py) and loads its HTTPS port instead (wrk
keeps its TLS connections alive); the Python load generator speaks plain HTTP only and is
skipped then. wrk runs one thread by default: on a small machine a second one takes CPU from
the proxy and the app it measures. Run as root (like
bench/zero_downtime.py, whose throwaway-app helper this uses); loopback only; every run bounded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import wrk
from loadgen import LoadResult, run_during
from tls_app import TlsBenchApp
from zero_downtime import ENV, BenchApp, Command, SetupError, must, preflight, terminate_as_exit

# Measured on main before this change (issue 10 and the README), for comparison.
RELOAD_SWITCH = {"deploy": "3 read errors in 10,955 requests, 0 non-2xx",
                 "rollback": "1 read error in 30,187 requests, 0 non-2xx"}
IN_PLACE_BASELINE = ("docker compose up -d --force-recreate in place: 311 failed of 20,006 "
                     "(bench/zero_downtime.py, README)")


@dataclass
class WrkPhase:
    label: str
    result: wrk.WrkResult
    command: Command
    covered: bool  # wrk was still running when the command ended


def load_url(app: BenchApp, scheme: str) -> str:
    if scheme == "http":
        return f"http://127.0.0.1:{app.ports['proxy']}/version"
    port = app.ports.get("https")
    if port is None:
        raise SetupError("--scheme https needs an HTTPS port in the environment (ports.https, "
                         "the TLS work); this configuration has none")
    return f"https://127.0.0.1:{port}/version"


def with_wrk(app: BenchApp, label: str, argv: tuple[str, ...], url: str,
             args: argparse.Namespace) -> WrkPhase:
    """wrk for --wrk-seconds; the command starts after a second of load."""
    load = wrk.Wrk(url, args.wrk_seconds, threads=args.threads,
                   connections=args.connections).start()
    time.sleep(1.0)
    command = app.inv(*argv)
    covered = time.monotonic() < load.ends_at
    return WrkPhase(label, load.result(), command, covered)


def with_loadgen(app: BenchApp, argv: tuple[str, ...], args: argparse.Namespace
                 ) -> tuple[LoadResult, Command]:
    load, command, _ = run_during(lambda: app.inv(*argv), args.min_requests,
                                  port=app.ports["proxy"], path="/version",
                                  workers=args.connections, max_seconds=args.wrk_seconds * 2,
                                  retries=0)
    return load, command


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def benchmark(app: BenchApp, args: argparse.Namespace) -> list[str]:
    def say(text: str) -> None:
        print(text, flush=True)

    url = load_url(app, args.scheme)
    say(f"app {app.name}: proxy 127.0.0.1:{app.ports['proxy']}, slots {app.ports['blue']}/"
        f"{app.ports['green']}; load average {load_average()}")
    must(app.inv("deploy", f"--env={ENV}"), "first deploy (v1)")
    v1 = app.commits[0]
    v2 = app.commit("v2")
    say(f"wrk ({args.connections} connections, {args.wrk_seconds:g} s) during inv deploy "
        f"v1 {v1} -> v2 {v2} ...")
    deploy = with_wrk(app, "wrk: inv deploy (v1 -> v2)", ("deploy", f"--env={ENV}"), url, args)
    must(deploy.command, "inv deploy under wrk")
    say("wrk during inv rollback v2 -> v1 ...")
    rollback = with_wrk(app, "wrk: inv rollback (v2 -> v1)", ("rollback", f"--env={ENV}"),
                        url, args)
    must(rollback.command, "inv rollback under wrk")
    phases = [deploy, rollback]

    generator: list[tuple[str, LoadResult]] = []
    if args.scheme == "http":
        v3 = app.commit("v3")
        say(f"loadgen (0 retries) during inv deploy v1 -> v3 {v3} ...")
        load, command = with_loadgen(app, ("deploy", f"--env={ENV}"), args)
        must(command, "inv deploy under loadgen")
        generator.append(("loadgen: inv deploy (v1 -> v3)", load))
        say("loadgen (0 retries) during inv rollback v3 -> v1 ...")
        load, command = with_loadgen(app, ("rollback", f"--env={ENV}"), args)
        must(command, "inv rollback under loadgen")
        generator.append(("loadgen: inv rollback (v3 -> v1)", load))

    out = ["", f"{args.scheme.upper()}, keep-alive, no retries, wrk {args.threads} thread(s) "
               f"{args.connections} connections; load average after: {load_average()}",
           f"{'phase':<36}{'requests':>10}{'socket errors':>15}{'non-2xx':>9}{'req/s':>8}"
           f"{'p50 ms':>8}{'p99 ms':>8}"]
    for phase in phases:
        r = phase.result
        out.append(f"{phase.label:<36}{r.requests:>10}{r.socket_errors:>15}{r.non_2xx:>9}"
                   f"{r.rps:>8.0f}{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}"
                   + ("" if phase.covered else "  (WARN: the command outlived the load)"))
        out.append(f"{'':<4}socket errors: {r.errors_text()}; command {phase.command.wall_s:.1f} s")
    for label, load in generator:
        out.append(f"{label:<36}{load.sent:>10}{load.conn_errors:>15}{load.non_2xx:>9}"
                   f"{load.rps:>8.0f}{load.p50_ms:>8.1f}{load.p99_ms:>8.1f}")
        if load.failure_reasons:
            out.append(f"{'':<4}failures: {dict(load.failure_reasons)}")
    zero = all(p.result.socket_errors == 0 and p.result.non_2xx == 0 for p in phases) and all(
        load.failed == 0 and load.retried == 0 for _, load in generator)
    out += ["", f"goal 0 socket errors and 0 non-2xx everywhere: {'PASS' if zero else 'FAIL'}",
            "before (graceful reload switch, wrk through the staging proxy):",
            f"  deploy: {RELOAD_SWITCH['deploy']}", f"  rollback: {RELOAD_SWITCH['rollback']}",
            f"baseline: {IN_PLACE_BASELINE}"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=("http", "https"), default="http")
    parser.add_argument("--wrk-seconds", type=float, default=40.0,
                        help="each wrk run (must outlast a deploy)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--min-requests", type=int, default=5000,
                        help="loadgen: at least this many requests per phase")
    parser.add_argument("--engine", choices=("haproxy", "nginx"), default="haproxy",
                        help="proxy.engine of the deployed app (default: the product's)")
    args = parser.parse_args(argv)
    args.wrk_seconds = max(10.0, min(args.wrk_seconds, 300.0))
    args.connections = max(1, min(args.connections, 128))
    args.threads = max(1, min(args.threads, args.connections, 8))
    try:
        preflight()
        wrk.Wrk("http://127.0.0.1/", 1)  # wrk installed?
    except (SetupError, wrk.WrkMissing) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    kind = TlsBenchApp if args.scheme == "https" else BenchApp
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
        leftovers = app.cleanup()
        for command in leftovers:
            print(f"bench: left behind, remove with: {command}", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
