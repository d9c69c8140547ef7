"""Where the time of a FLEET deploy goes (scripts/testbed-fleet.sh), for 1, 2 and 3 hosts in one
run, and the tool's own overhead on one host.

For N = 1, 2, 3: a throwaway copy of examples/demo on the first N fleet hosts (`production`
environment, `registry` strategy with a repository of its own; unique ports, so no port-80 lock
and no load balancer), then
  - a first deploy (v1) and a second deploy (v2, the one compared: it has an old slot to drain),
  - a rollback (v2 -> v1): "traffic on ... after X s" as the tool prints it,
  - for N = 1 only: the app's own boot-to-healthy time (start the stopped slot, poll /health).
Each run's app is removed from every host before the next N starts.

"Build excluded": every commit is new, so each deploy builds its image here and pushes it; the
run log's `docker build` / `docker push` commands are subtracted (`excl_build`). The pulls by
digest stay in: they are per-host work a fleet deploy does. `overhead` is deploy_timing.py's
definition: wall - the whole build step - health - configured drain.

    .venv/bin/python bench/fleet_timing.py

Prints figures (targets marked PASS/FAIL; it asserts nothing); exit 2 only when the setup
failed. Run as root; loopback and 10.77.0.0/24 only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runlog  # noqa: E402
from fleet import FLEET_HOSTS, FleetBenchApp, fleet_preflight  # noqa: E402
from zero_downtime import SetupError, must, terminate_as_exit, verdict  # noqa: E402

FLEET_RATIO_TARGET = 1.3
OVERHEAD_TARGET_S = 1.5
ROLLBACK_MARGIN_S = 1.5


@dataclass
class Timed:
    label: str
    hosts: int
    wall: float
    log: runlog.RunLog
    connections: int | None
    drain: float
    traffic_s: float | None = None

    @property
    def build(self) -> float:
        return self.log.steps.get("build", 0.0)

    @property
    def health(self) -> float:
        return self.log.steps.get("health", 0.0)

    @property
    def excl_build(self) -> float:
        return self.wall - self.log.publish_s

    @property
    def overhead(self) -> float:
        return self.wall - self.build - self.health - self.drain


def timed(app: FleetBenchApp, label: str, operation: str, drain: float) -> Timed:
    before = set(app.log_dir.glob("*.log"))
    started = time.monotonic()
    out = must(app.deploy() if operation == "deploy" else app.rollback(),
               f"inv {operation} ({label}, {len(app.hosts)} hosts)")
    wall = time.monotonic() - started
    log = runlog.newest(app.log_dir, app.env, before, operation)
    return Timed(label, len(app.hosts), wall, log, runlog.ssh_connections(out.output), drain,
                 runlog.traffic_after(out.output) if operation == "rollback" else None)


def one_fleet(hosts: tuple[str, ...], say) -> tuple[list[Timed], float | None]:
    app = FleetBenchApp(Path(tempfile.mkdtemp(prefix="togather-fleet-timing-")), hosts=hosts)
    rows: list[Timed] = []
    healthy = None
    try:
        app.setup()
        import yaml
        config = yaml.safe_load((app.repo / "config" / "deployment.yml").read_text())
        drain = float(config["deployment"]["drain_seconds"])
        say(f"{len(hosts)} host(s) {', '.join(hosts)}: app {app.name} ...")
        rows.append(timed(app, "first", "deploy", 0.0))  # a first deploy has no old slot
        app.commit("v2")
        rows.append(timed(app, "second", "deploy", drain))
        rows.append(timed(app, "rollback", "rollback", drain))
        if len(hosts) == 1:
            active = app.status()["active_slot"]
            idle = "green" if active == "blue" else "blue"
            healthy = app.boot_to_healthy(hosts[0], idle)
    finally:
        leftovers = app.cleanup()
        for line in leftovers:
            say(f"left over, remove by hand: {line}")
    return rows, healthy


def report(rows: list[Timed], healthy: float | None) -> list[str]:
    out = ["", f"{'hosts':<6}{'run':<10}{'wall_s':>8}{'build_s':>9}{'publish':>9}"
               f"{'excl_bld':>9}{'health':>8}{'drain':>7}{'overhd':>8}{'ssh':>5}{'ssh/host':>9}"]
    for r in rows:
        per_host = "-" if r.connections is None else f"{r.connections / r.hosts:.1f}"
        out.append(f"{r.hosts:<6}{r.label:<10}{r.wall:8.2f}{r.build:9.2f}{r.log.publish_s:9.2f}"
                   f"{r.excl_build:9.2f}{r.health:8.2f}{r.drain:7.1f}{r.overhead:8.2f}"
                   f"{r.connections if r.connections is not None else '-':>5}{per_host:>9}")
    out.append("publish = the run log's docker build + push (the one-off image build, here); "
               "excl_bld = wall - publish (pulls stay in); overhd = wall - build step - health "
               "- drain (deploy_timing.py's definition)")
    second = {r.hosts: r for r in rows if r.label == "second"}
    rollbacks = {r.hosts: r for r in rows if r.label == "rollback"}
    targets = []
    if 1 in second and 3 in second:
        ratio = second[3].excl_build / second[1].excl_build
        ratio_first = None
        firsts = {r.hosts: r for r in rows if r.label == "first"}
        if 1 in firsts and 3 in firsts:
            ratio_first = firsts[3].excl_build / firsts[1].excl_build
        targets.append((ratio <= FLEET_RATIO_TARGET,
                        f"3 hosts within {FLEET_RATIO_TARGET}x of one host, build excluded "
                        f"(second deploy): {second[3].excl_build:.2f} / "
                        f"{second[1].excl_build:.2f} s = {ratio:.2f}x"
                        + ("" if ratio_first is None else
                           f" (first deploy: {ratio_first:.2f}x)")))
        if 2 in second:
            two = second[2].excl_build / second[1].excl_build
            targets.append((True, f"info: 2 hosts {two:.2f}x of one host (second deploy, "
                                  "build excluded)"))
    for r in (x for x in rows if x.label != "rollback"):
        if r.connections is not None:
            targets.append((r.connections <= r.hosts,
                            f"ssh connections one per host ({r.hosts} hosts, {r.label}: "
                            f"{r.connections})"))
    if 1 in second:
        targets.append((second[1].overhead <= OVERHEAD_TARGET_S,
                        f"one host: the tool's own overhead per deploy <= {OVERHEAD_TARGET_S} s "
                        f"({second[1].overhead:.2f} s second deploy; first "
                        f"{next(r.overhead for r in rows if r.hosts == 1):.2f} s)"))
    if 1 in rollbacks and healthy is not None:
        traffic = rollbacks[1].traffic_s
        limit = healthy + ROLLBACK_MARGIN_S
        targets.append((traffic is not None and traffic <= limit,
                        f"one host: rollback traffic on the previous version within the app's "
                        f"boot-to-healthy + {ROLLBACK_MARGIN_S} s "
                        f"({'-' if traffic is None else f'{traffic:.1f}'} s <= {healthy:.2f} + "
                        f"{ROLLBACK_MARGIN_S} = {limit:.2f} s)"))
    for n, r in sorted(rollbacks.items()):
        targets.append((True, f"info: rollback on {n} host(s): traffic after "
                              f"{'-' if r.traffic_s is None else f'{r.traffic_s:.1f}'} s, wall "
                              f"{r.wall:.2f} s, ssh {r.connections}"))
    out += ["", "targets:", *(f"  {'info' if text.startswith('info') else verdict(ok)}  "
                              f"{text.removeprefix('info: ')}" for ok, text in targets)]
    out += ["", "where the time goes (run log: step wall time; per host: seconds spent in "
                "commands / number of commands, i.e. round trips):"]
    for r in rows:
        if r.label in ("second", "rollback") or r.hosts == 3:
            out.append(f"  {r.hosts} host(s), {r.label} ({r.wall:.2f} s wall):")
            out.append(r.log.table())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,3", help="fleet sizes to run (default 1,2,3)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    if not sizes or any(not 1 <= n <= len(FLEET_HOSTS) for n in sizes):
        parser.error(f"--sizes: numbers from 1 to {len(FLEET_HOSTS)}")

    def say(text: str) -> None:
        print(text, flush=True)

    rows: list[Timed] = []
    healthy = None
    code = 0
    with terminate_as_exit():
        try:
            fleet_preflight()
            for n in sizes:
                got, boot = one_fleet(FLEET_HOSTS[:n], say)
                rows += got
                healthy = boot if boot is not None else healthy
        except SetupError as exc:
            print(f"benchmark setup failed: {exc}", file=sys.stderr)
            code = 2
    if rows:
        say("\n".join(report(rows, healthy)))
        if healthy is not None:
            say(f"the app's own boot-to-healthy time on host1: {healthy:.2f} s (docker start of "
                "the stopped slot to the first 2xx /health, polled every 50 ms; median of 3)")
    return code


if __name__ == "__main__":
    sys.exit(main())
