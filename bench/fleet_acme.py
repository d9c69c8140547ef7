"""How long a fleet of three takes to obtain its HTTPS certificates behind a load balancer
(Pebble, HTTP-01, every host answering every host's challenge): one run, about a minute.

It deploys a throwaway copy of examples/demo to togather-host1..3 with `proxy.tls.acme` and
`peers`, its proxies on the hosts' port 80 (under the port-80 lock the e2e tests take), its
domain resolving in Pebble's DNS to the test bed's HTTP-01 door over the hosts' port 80
(127.78.0.1:9080, round robin: scripts/testbed-fleet.sh), then reports the first deploy's
`certs` step (every host's proxy loads the challenge site, then each host registers, orders,
is validated through the door, installs its certificate and starts its renewer), with the
hosts at once (`deployment.parallel` unset) or one after another (`--parallel 1`), the next
deploy's (every certificate reused), and how many validation requests reached a host
without the token and were forwarded to a peer (the proxies' logs).

Everything it creates is removed at the end. Run as root:

    .venv/bin/python bench/fleet_acme.py [--parallel N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from acme_obtain import ACME_ROOT, PEBBLE_API_CA, challtestsrv, release, step_seconds
from fleet import FLEET_HOSTS, FleetBenchApp, docker_argv, fleet_preflight, port80_lock
from zero_downtime import SetupError, free_ports, must, run

ACME_DOOR = "127.78.0.1"  # scripts/testbed-fleet.sh: ACME_LB_ADDR (port 9080)
DIRECTORY = "https://10.77.0.1:14000/dir"  # Pebble, as the fleet hosts reach it


class FleetAcmeApp(FleetBenchApp):
    parallel: int | None = None

    @property
    def domain(self) -> str:
        return f"{self.name}.togather.test"

    def pick_ports(self) -> dict[str, int]:
        ports = super().pick_ports()
        return {**ports, "https": free_ports(1)[0]}

    def environment(self) -> dict:
        env = super().environment()
        peers = {f"togather-{h}": f"10.77.0.{10 + int(h[-1])}" for h in self.hosts}
        env["proxy"] = {**env["proxy"], "tls": {
            "acme": {"domains": [self.domain], "email": "bench@togather.test",
                     "directory": DIRECTORY, "ca_bundle": PEBBLE_API_CA, "peers": peers},
            "verify_ca": ACME_ROOT, "redirect": False}}
        if self.parallel:
            env["deployment"] = {"parallel": self.parallel}
        return env

    def forwarded(self) -> int:
        """Challenge requests the hosts' proxies forwarded to a peer (tls.acme_peers_block's
        log line)."""
        count = 0
        for host in self.hosts:
            out = run(docker_argv(host, "ps", "-q", "--filter",
                                  f"label=com.docker.compose.project={self.project}",
                                  "--filter", "label=com.docker.compose.service=proxy"),
                      timeout=60).output.split()
            for container in out:
                logs = run(docker_argv(host, "logs", container), timeout=60).output
                count += logs.count("not in the webroot here: asked")
        return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=None,
                        help="deployment.parallel (default: unset, every host at once)")
    args = parser.parse_args()
    app = FleetAcmeApp(Path(tempfile.mkdtemp(prefix="togather-bench-fleet-acme-")),
                       hosts=FLEET_HOSTS, through_lb=True)
    app.parallel = args.parallel
    leftovers: list[str] = []
    try:
        fleet_preflight()
        with port80_lock(900):
            try:
                app.setup()
                challtestsrv("add-a", host=app.domain, addresses=[ACME_DOOR])
                first = must(app.deploy(), "first deploy")
                obtain = step_seconds(first, "certs")
                if first.output.count("certificate obtained") != len(FLEET_HOSTS):
                    raise SetupError(f"not every host obtained a certificate:\n{first.tail()}")
                forwarded = app.forwarded()
                app.commit("v2")
                second = must(app.deploy(), "second deploy")
                reuse = step_seconds(second, "certs")
            finally:
                leftovers += release(app)
        how = f"deployment.parallel {args.parallel}" if args.parallel else "every host at once"
        print(f"ACME (Pebble) on a fleet of {len(FLEET_HOSTS)} behind a round-robin load "
              f"balancer, {how}")
        print(f"  first deploy, certs step (every host obtains its own): {obtain:.1f} s "
              f"(whole deploy {first.wall_s:.1f} s)")
        print(f"  validation requests forwarded to a peer: {forwarded}")
        print(f"  next deploy, certs step (every certificate reused): {reuse:.1f} s")
        return 0
    except SetupError as exc:
        print(f"bench: setup failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for line in leftovers:
            print(f"bench: left behind, remove by hand: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
