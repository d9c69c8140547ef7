"""Sustained throughput through the proxy vs straight to the active slot (issue 10), side by
side in one run on the staging test bed.

A throwaway copy of examples/demo is deployed; then wrk (keep-alive) runs for --seconds each,
in this order: direct to the active slot's port, through the proxy, through the proxy again
right after, direct again. After each run it counts the sockets in TIME_WAIT in the proxy's
network namespace (`ss -tan state time-wait`, entered through the proxy container's pid): a
proxy that opened a new upstream connection per request piled up ~14,000 of them and lost
two thirds of its throughput (issue 10). Goal: through the proxy >= 90 % of direct, both
runs, and no TIME_WAIT pile-up. About four and a half minutes with the default 60 s.

    .venv/bin/python bench/proxy_throughput.py [--seconds 60] [--connections 16]

Run as root; loopback only; every run bounded. The machine is shared: the load average is
printed with each run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import wrk
from zero_downtime import ENV, BenchApp, SetupError, must, preflight, terminate_as_exit

GOAL = 0.90


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def proxy_pid(app: BenchApp) -> str:
    ids = must(app.compose("ps", "--quiet", "proxy", timeout=60), "compose ps").output.split()
    if not ids:
        raise SetupError("the proxy is not running")
    out = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}} "
                          "{{.HostConfig.NetworkMode}}", ids[0]], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    return out[0]


def time_wait(pid: str, ports: tuple[int, ...]) -> tuple[int, int]:
    """(all TIME_WAIT sockets, those to or from `ports`) in the network namespace of `pid`."""
    def count(*condition: str) -> int:
        out = subprocess.run(["nsenter", "-t", pid, "-n", "ss", "-Htan", "state", "time-wait",
                              *condition], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        return len(out.splitlines())

    ours = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    return count(), count(f"( {ours} )")


def benchmark(app: BenchApp, args: argparse.Namespace) -> list[str]:
    def say(text: str) -> None:
        print(text, flush=True)

    must(app.inv("deploy", f"--env={ENV}"), "deploy")
    active = app.status()["active_slot"]
    direct = f"http://127.0.0.1:{app.ports[active]}/version"
    proxied = f"http://127.0.0.1:{app.ports['proxy']}/version"
    pid = proxy_pid(app)
    ports = (app.ports["proxy"], app.ports["blue"], app.ports["green"])
    runs = [("direct to app-" + active, direct), ("through the proxy", proxied),
            ("through the proxy, again", proxied), ("direct to app-" + active + ", again",
                                                    direct)]
    rows = []
    for label, url in runs:
        say(f"{label}: wrk {args.seconds:g} s, {args.connections} connections "
            f"(load average {load_average()}) ...")
        result = wrk.run(url, args.seconds, threads=2, connections=args.connections)
        waiting = time_wait(pid, ports)
        rows.append((label, result, waiting, load_average()))

    direct_rps = [r.rps for label, r, _, _ in rows if label.startswith("direct")]
    proxy_rps = [r.rps for label, r, _, _ in rows if label.startswith("through")]
    reference = max(direct_rps)
    out = ["", f"{'run':<30}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'errors':>8}"
               f"{'non-2xx':>9}{'TIME_WAIT all/ours':>20}  load avg after"]
    for label, r, (all_tw, ours), load in rows:
        out.append(f"{label:<30}{r.rps:>9.0f}{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}"
                   f"{r.socket_errors:>8}{r.non_2xx:>9}{f'{all_tw}/{ours}':>20}  {load}")
    ratios = [rps / reference for rps in proxy_rps]
    piled = max(ours for _, _, (_, ours), _ in rows)
    out += ["", "through the proxy / best direct run: "
            + ", ".join(f"{ratio:.0%}" for ratio in ratios),
            f"goal >= {GOAL:.0%} both runs: {'PASS' if min(ratios) >= GOAL else 'FAIL'}",
            f"TIME_WAIT to the proxy's and slots' ports after any run: {piled} "
            f"({'no pile-up' if piled < 1000 else 'PILE-UP'}; main had ~14,000)",
            "before (main, issue 10): direct ~2,040 req/s; through the proxy four 8 s runs "
            "1,880, 1,380, 700, 660 req/s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    args.seconds = max(5.0, min(args.seconds, 300.0))
    args.connections = max(1, min(args.connections, 128))
    try:
        preflight()
        wrk.Wrk("http://127.0.0.1/", 1)
    except (SetupError, wrk.WrkMissing) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    app = BenchApp(Path(tempfile.mkdtemp(prefix="togather-bench-")))
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
