"""Zero-downtime benchmark on the FLEET test bed (scripts/testbed-fleet.sh): one run, a few
minutes.

A throwaway copy of examples/demo goes to the three fleet hosts through the `production`
environment (registry strategy, its own registry repository, app name, compose project, remote
directory and PostgreSQL database; proxy on port 80, which the load balancer targets, taken
under the machine-wide port-80 lock of the e2e fixtures). Keep-alive load through the load
balancer (HAProxy, 127.0.0.1:10080) while:

  (a) `inv deploy --env=production` of a new commit (v1 -> v2),
  (b) `inv rollback --env=production` (v2 -> v1).

Prints requests, failed, retried, p50/p99 and wall time per operation, the per-second
slot/version timeline, and the 0-failed target with PASS/FAIL; exits 0 unless the setup itself
failed (it is a benchmark, not a test). Everything is removed from every host at the end, even
on failure. It only drives the `inv` CLI, so it measures whatever the deploy operation is
(sequential over the hosts today, parallel later).

    .venv/bin/python bench/fleet_zero_downtime.py [--min-requests 20000] [--workers 16]

Run as root; loopback and 10.77.0.0/24 only; every wait and every load run is bounded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runlog  # noqa: E402
from fleet import FLEET_HOSTS, LB_PORT, FleetBenchApp, fleet_preflight, port80_lock  # noqa: E402
from zero_downtime import (  # noqa: E402
    COLUMNS,
    SetupError,
    describe,
    must,
    phase_row,
    row,
    terminate_as_exit,
    under_load,
    verdict,
)


def benchmark(app: FleetBenchApp, args: argparse.Namespace) -> list[str]:
    def say(text: str) -> None:
        print(text, flush=True)

    say(f"app {app.name} on {', '.join(app.hosts)}: proxy port 80 behind the load balancer "
        f"127.0.0.1:{LB_PORT}, slots {app.ports['blue']}/{app.ports['green']}, remote dir "
        f"{app.remote_dir}, database {app.database}, registry {app.registry_repo}")
    v1 = app.commits[0]
    first = must(app.deploy(), "first deploy (v1)")
    say(f"first deploy of v1 {v1} without load: {first.wall_s:.1f} s "
        f"(ssh connections: {runlog.ssh_connections(first.output)})")
    waited = app.wait_lb_serves(v1)
    say(f"the load balancer serves v1 from every host ({waited:.1f} s after the deploy)")

    v2 = app.commit("v2")
    say(f"(a) inv deploy of v2 {v2} under load through 127.0.0.1:{LB_PORT} ...")
    a = under_load(app, "(a) inv deploy (v1 -> v2)", ("deploy", f"--env={app.env}", "--yes"),
                   args)
    must(a.command, "(a) inv deploy")
    app.wait_lb_serves(v2)

    say(f"(b) inv rollback to v1 {v1} under load ...")
    b = under_load(app, "(b) inv rollback (v2 -> v1)",
                   ("rollback", f"--env={app.env}", "--yes"), args)
    must(b.command, "(b) inv rollback")

    out = ["", f"fleet: {len(app.hosts)} hosts, {args.workers} keep-alive clients through "
               f"HAProxy 127.0.0.1:{LB_PORT}", row(COLUMNS), phase_row(a), phase_row(b), ""]
    for phase in (a, b):
        out.append(f"{phase.label}: ssh connections "
                   f"{runlog.ssh_connections(phase.command.output)}; progress lines "
                   "(t = since the command's start):")
        out.append(phase.command.timed_steps())
    traffic = runlog.traffic_after(b.command.output)
    out.append(f"rollback: the tool reports traffic on the previous version after "
               f"{'-' if traffic is None else f'{traffic:.1f} s'}")
    targets = [
        (a.load.failed == 0, f"(a) fleet deploy under load: 0 failed requests "
                             f"({a.load.failed}, retried {a.load.retried})"),
        (b.load.failed == 0, f"(b) fleet rollback under load: 0 failed requests "
                             f"({b.load.failed}, retried {b.load.retried})"),
    ]
    out += ["", "targets:", *(f"  {verdict(ok)}  {text}" for ok, text in targets)]
    covered = all(p.load.started_monotonic + p.load.duration_s
                  >= p.command.started + p.command.wall_s for p in (a, b))
    out.append(f"  {'ok  ' if covered else 'WARN'}  the load covered both commands "
               f"({a.load.sent} and {b.load.sent} requests)")
    out += ["", *(describe(p) for p in (a, b))]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-requests", type=int, default=20000,
                        help="requests per measured operation (default 20000)")
    parser.add_argument("--workers", type=int, default=16, help="keep-alive clients")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="hard cap on each load run (default 300)")
    parser.add_argument("--lock-wait", type=float, default=900.0,
                        help="how long to wait for the fleet's port-80 lock (default 900 s)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temporary repository and run logs")
    args = parser.parse_args(argv)
    if args.min_requests < 1 or args.workers < 1:
        parser.error("--min-requests and --workers must be positive")

    code = 0
    with terminate_as_exit():
        try:
            fleet_preflight()
            with port80_lock(args.lock_wait):
                app = FleetBenchApp(Path(tempfile.mkdtemp(prefix="togather-fleet-bench-")),
                                    hosts=FLEET_HOSTS, through_lb=True)
                try:
                    app.setup()
                    print("\n".join(benchmark(app, args)), flush=True)
                finally:
                    leftovers = app.cleanup(keep_workdir=args.keep_workdir)
                    if leftovers:
                        print("cleanup incomplete; finish it by hand:\n  "
                              + "\n  ".join(leftovers), file=sys.stderr)
                    if args.keep_workdir:
                        print(f"kept {app.workdir}", file=sys.stderr)
        except SetupError as exc:
            print(f"benchmark setup failed: {exc}", file=sys.stderr)
            code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
