"""Zero-downtime benchmark of the SWARM engine (issue 12) on the fleet test bed's swarm
(host1 manager, host2/host3 workers; scripts/testbed-fleet.sh), and its deploy wall time
against the compose fleet on the same three hosts.

A throwaway copy of examples/demo as the environment `cluster` (`engine: swarm`, registry
strategy with its own repository, its own database; published port 8090 in host mode, which
the load balancer on 127.0.0.1:11080 checks on every node). Keep-alive load through
127.0.0.1:11080 while:

  (a) `inv deploy --env=cluster` of a new commit (v1 -> v2): a start-first rolling update,
  (b) `inv rollback --env=cluster` (v2 -> v1).

Then (unless --no-compose) the same demo as a compose fleet (`production`, the same three
hosts, unique ports, no load balancer): first deploy and a second deploy's wall time, to
compare with the swarm's (every commit is new: each deploy builds and pushes its image).

    .venv/bin/python bench/swarm.py [--min-requests 5000] [--workers 8] [--no-compose]

Prints figures and the 0-failed target with PASS/FAIL; asserts nothing; exit 2 only when the
setup failed. Everything is removed at the end, even on failure. Run as root; loopback and
10.77.0.0/24 only; every wait and every load run is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import FLEET_HOSTS, FleetBenchApp, alias, fleet_preflight  # noqa: E402
from zero_downtime import (  # noqa: E402
    COLUMNS,
    SetupError,
    describe,
    must,
    phase_row,
    row,
    run,
    terminate_as_exit,
    under_load,
    verdict,
)

SWARM_ENV = "cluster"
SWARM_PORT = 8090
SWARM_LB_PORT = 11080
SWARM_LOCK = Path("/run/togather-testbed/swarm-8090.lock")  # shared with tests/e2e/test_swarm.py
MANAGER = ["docker", "-H", "unix:///run/togather-fleet/host1/docker.sock"]


@contextlib.contextmanager
def swarm_lock(wait_s: float) -> Iterator[None]:
    """Port 8090 behind 11080 is one app's at a time (bounded wait)."""
    SWARM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(SWARM_LOCK, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SetupError(f"{SWARM_LOCK} still held after {wait_s:g} s") from None
                time.sleep(1)
        yield


@dataclass
class SwarmBenchApp(FleetBenchApp):
    env: str = SWARM_ENV

    @property
    def load_port(self) -> int:
        return SWARM_LB_PORT

    def environment(self) -> dict:
        env = super().environment()
        env.update(engine="swarm", public_url=f"http://127.0.0.1:{SWARM_LB_PORT}")
        env["ports"]["proxy"] = SWARM_PORT
        env.pop("proxy", None)
        return env

    def pick_ports(self) -> dict[str, int]:
        ports = super().pick_ports()
        return {**ports, "proxy": SWARM_PORT}

    def setup(self) -> None:
        super().setup()
        env_file = self.repo / "config" / "environments" / f".env.{self.env}"
        text = env_file.read_text()
        env_file.write_text(text.replace("ENVIRONMENT='production'", f"ENVIRONMENT='{self.env}'"))

    def deploy(self, *args: str, timeout: float = 900):
        return self.inv("deploy", f"--env={self.env}", *args, timeout=timeout)

    def wait_swarm_serves(self, version: str, timeout_s: float = 90, streak: int = 20) -> float:
        started = time.monotonic()
        good = 0
        while good < streak:
            if time.monotonic() - started > timeout_s:
                raise SetupError(f"127.0.0.1:{SWARM_LB_PORT} did not serve {version} {streak} "
                                 f"times in a row within {timeout_s:g} s")
            conn = http.client.HTTPConnection("127.0.0.1", SWARM_LB_PORT, timeout=2)
            try:
                conn.request("GET", "/version", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                served = json.loads(body).get("version") if body[:1] == b"{" else None
                good = good + 1 if resp.status == 200 and served == version else 0
            except (OSError, http.client.HTTPException, ValueError):
                good = 0
            finally:
                conn.close()
            if good == 0:
                time.sleep(0.1)
        return time.monotonic() - started

    def cleanup(self, *, keep_workdir: bool = False) -> list[str]:
        leftovers = []
        run([*MANAGER, "service", "rm", self.project], timeout=120)
        for _ in range(60):
            if run([*MANAGER, "service", "inspect", self.project], timeout=60).returncode != 0:
                break
            time.sleep(0.5)
        # The tasks' containers go asynchronously; the images they hold cannot go before.
        for host in FLEET_HOSTS:
            docker = ["docker", "-H", f"unix:///run/togather-fleet/{host}/docker.sock"]
            for _ in range(60):
                if not run([*docker, "ps", "-aq", "--filter",
                            f"label=com.docker.swarm.service.name={self.project}"],
                           timeout=60).output.strip():
                    break
                time.sleep(0.5)
        secrets = run([*MANAGER, "secret", "ls", "-q", "--filter",
                       f"label=com.togather.service={self.project}"], timeout=60).output.split()
        for _ in range(20):
            if not secrets or run([*MANAGER, "secret", "rm", *secrets], timeout=60
                                  ).returncode == 0:
                break
            time.sleep(1)
        else:
            leftovers.append(f"{' '.join(MANAGER)} secret rm {' '.join(secrets)}")
        return leftovers + super().cleanup(keep_workdir=keep_workdir)


def swarm_benchmark(app: SwarmBenchApp, args: argparse.Namespace) -> tuple[list[str], dict]:
    def say(text: str) -> None:
        print(text, flush=True)

    say(f"app {app.name} as `{app.env}` (engine swarm) on {', '.join(app.hosts)}: port "
        f"{SWARM_PORT} (host mode) behind 127.0.0.1:{SWARM_LB_PORT}, registry {app.registry_repo}")
    v1 = app.commits[0]
    first = must(app.deploy(), "first swarm deploy (v1)")
    say(f"first swarm deploy of v1 {v1} (service create) without load: {first.wall_s:.1f} s")
    app.wait_swarm_serves(v1)

    v2 = app.commit("v2")
    say(f"(a) inv deploy of v2 {v2} under load through 127.0.0.1:{SWARM_LB_PORT} ...")
    a = under_load(app, "(a) swarm deploy (v1 -> v2)", ("deploy", f"--env={app.env}"), args)
    must(a.command, "(a) inv deploy")
    app.wait_swarm_serves(v2)
    say(f"(b) inv rollback to v1 {v1} under load ...")
    b = under_load(app, "(b) swarm rollback (v2 -> v1)", ("rollback", f"--env={app.env}"), args)
    must(b.command, "(b) inv rollback")
    v3 = app.commit("v3")
    third = must(app.deploy(), "swarm deploy of v3 without load")
    say(f"swarm deploy of v3 {v3} without load: {third.wall_s:.1f} s")

    out = ["", f"swarm: {len(app.hosts)} nodes, {args.workers} keep-alive clients through "
               f"HAProxy 127.0.0.1:{SWARM_LB_PORT}", row(COLUMNS), phase_row(a), phase_row(b),
           ""]
    for phase in (a, b):
        out.append(f"{phase.label}: progress lines (t = since the command's start):")
        out.append(phase.command.timed_steps())
    targets = [
        (a.load.failed == 0, f"(a) swarm deploy under load: 0 failed requests "
                             f"({a.load.failed}, retried {a.load.retried})"),
        (b.load.failed == 0, f"(b) swarm rollback under load: 0 failed requests "
                             f"({b.load.failed}, retried {b.load.retried})"),
    ]
    out += ["", "targets:", *(f"  {verdict(ok)}  {text}" for ok, text in targets)]
    out += ["", *(describe(p) for p in (a, b))]
    return out, {"first": first.wall_s, "second": a.wall_s, "third": third.wall_s,
                 "rollback": b.wall_s}


def compose_timing() -> dict:
    app = FleetBenchApp(Path(tempfile.mkdtemp(prefix="togather-swarm-bench-compose-")),
                        hosts=FLEET_HOSTS, through_lb=False)
    try:
        app.setup()
        first = must(app.deploy(), "compose fleet first deploy")
        app.commit("v2")
        second = must(app.deploy(), "compose fleet second deploy")
        return {"first": first.wall_s, "second": second.wall_s}
    finally:
        leftovers = app.cleanup()
        if leftovers:
            print("compose cleanup incomplete:\n  " + "\n  ".join(leftovers), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-requests", type=int, default=5000,
                        help="requests per measured operation (default 5000)")
    parser.add_argument("--workers", type=int, default=8, help="keep-alive clients")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="hard cap on each load run (default 300)")
    parser.add_argument("--lock-wait", type=float, default=900.0)
    parser.add_argument("--no-compose", action="store_true",
                        help="skip the compose fleet's timing")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    if args.min_requests < 1 or args.workers < 1:
        parser.error("--min-requests and --workers must be positive")
    code = 0
    with terminate_as_exit():
        try:
            fleet_preflight()
            if run([*MANAGER, "info", "--format", "{{.Swarm.ControlAvailable}}"],
                   timeout=30).output.strip() != "true":
                raise SetupError("host1 is not a swarm manager: run `make testbed`")
            with swarm_lock(args.lock_wait):
                app = SwarmBenchApp(Path(tempfile.mkdtemp(prefix="togather-swarm-bench-")),
                                    hosts=FLEET_HOSTS)
                try:
                    app.setup()
                    lines, swarm_walls = swarm_benchmark(app, args)
                    print("\n".join(lines), flush=True)
                finally:
                    leftovers = app.cleanup(keep_workdir=args.keep_workdir)
                    if leftovers:
                        print("cleanup incomplete; finish it by hand:\n  "
                              + "\n  ".join(leftovers), file=sys.stderr)
            if not args.no_compose:
                walls = compose_timing()
                print(f"\ndeploy wall time on {', '.join(alias(h) for h in FLEET_HOSTS)} "
                      "(each commit new: build + push included):")
                print(f"  swarm:   first {swarm_walls['first']:.1f} s, second (under load) "
                      f"{swarm_walls['second']:.1f} s, third (no load) "
                      f"{swarm_walls['third']:.1f} s, rollback (under load) "
                      f"{swarm_walls['rollback']:.1f} s")
                print(f"  compose: first {walls['first']:.1f} s, second {walls['second']:.1f} s")
        except SetupError as exc:
            print(f"benchmark setup failed: {exc}", file=sys.stderr)
            code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
