"""The fleet test bed for the benchmarks (scripts/testbed-fleet.sh): a throwaway copy of the demo
deployed to some of the hosts togather-host1..3 through the `production` environment, and
everything needed to clean it off every host.

Same rules as tests/e2e/conftest.py's FleetApp: unique app name, compose project, remote
directory (/srv/togather/bench-<hex>/production on each host, /var/lib/togather-fleet/<host>/srv/...
from here), PostgreSQL database; `registry` strategy with a repository of its own in the test
bed's registry; proxy on port 80 only when the load balancer must reach it, and then only under
the machine-wide port-80 lock the e2e fixtures use. Only the `inv` CLI drives the deploys.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from zero_downtime import DEMO, INV, BenchApp, SetupError, free_ports, run

FLEET_HOSTS = ("host1", "host2", "host3")
FLEET_ENV = "production"
FLEET_ENV_FILE = DEMO / "config" / "environments" / ".env.production"
FLEET_STATE_ROOT = Path("/var/lib/togather-fleet")
FLEET_SOCK_ROOT = Path("/run/togather-fleet")
LB_PORT = 10080  # HAProxy on 127.0.0.1 over each host's port 80
REGISTRY = "registry.togather.test:5000"  # 127.0.0.1 from here, 10.77.0.1 on the hosts
PORT80_LOCK = Path("/run/togather-testbed/fleet-port80.lock")  # shared with tests/e2e
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


def alias(host: str) -> str:
    return f"togather-{host}"


def docker_argv(host: str, *args: str) -> list[str]:
    """`docker ARGS` against fleet `host`'s own daemon (as root, through its socket)."""
    return ["docker", "-H", f"unix://{FLEET_SOCK_ROOT / host / 'docker.sock'}", *args]


def in_netns(host: str, *argv: str) -> list[str]:
    """ARGV run in fleet `host`'s network namespace (its loopback is the host's loopback)."""
    return ["nsenter", f"--net=/run/netns/{alias(host)}", *argv]


def listening_ports(host: str) -> set[int]:
    out = run(in_netns(host, "ss", "-Hltn"), timeout=30)
    if out.returncode != 0:
        raise SetupError(f"cannot list the ports of {host}:\n{out.tail()}")
    return {int(line.split()[3].rsplit(":", 1)[1]) for _, line in out.lines if line.strip()}


def fleet_preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root")
    if not INV.exists():
        problems.append(f"{INV} not found (install the package in this interpreter's venv)")
    if not FLEET_ENV_FILE.is_file():
        problems.append(f"{FLEET_ENV_FILE} missing (start the test bed: make testbed)")
    # Without the bridge 10.77.0.x is not on this machine: never send it anything then.
    if not Path("/sys/class/net/tbbr0").exists():
        raise SetupError("the fleet test bed is not up (no bridge tbbr0): make testbed")
    for host in FLEET_HOSTS:
        with contextlib.suppress(SetupError):
            if run(["ssh", *SSH_OPTIONS, alias(host), "docker info -f ."], timeout=30
                   ).returncode == 0:
                continue
        problems.append(f"ssh {alias(host)} 'docker info' does not answer")
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=5):  # noqa: S310
            pass
    except (OSError, urllib.error.URLError) as exc:
        problems.append(f"the registry {REGISTRY} does not answer: {exc}")
    if problems:
        raise SetupError("; ".join(problems))


@contextlib.contextmanager
def port80_lock(wait_s: float) -> Iterator[IO[str]]:
    """The machine-wide lock of the fleet hosts' port 80 (the e2e fixtures take it too; bounded
    wait), then port 80 must be free on every host (whatever holds it would answer through the
    load balancer)."""
    PORT80_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(PORT80_LOCK, "a+") as handle:
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SetupError(f"{PORT80_LOCK} still held after {wait_s:g} s (a fleet "
                                     "test or benchmark behind the load balancer)") from None
                if not announced:
                    print(f"waiting (at most {wait_s:g} s) for {PORT80_LOCK} ...", flush=True)
                    announced = True
                time.sleep(1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} bench\n")
        handle.flush()
        busy = [h for h in FLEET_HOSTS if 80 in listening_ports(h)]
        if busy:
            raise SetupError(f"port 80 is in use on {', '.join(busy)} although the lock was "
                             "free (a fleet deploy left running?)")
        yield handle


@dataclass
class FleetBenchApp(BenchApp):
    """A BenchApp on fleet `hosts` (the first is the primary) in the `production` environment,
    `registry` strategy, its own registry repository. `through_lb`: proxy on port 80 (take
    port80_lock first) and public_url the load balancer; else unique ports everywhere."""

    env: str = FLEET_ENV
    secrets_file: Path = FLEET_ENV_FILE
    hosts: tuple[str, ...] = FLEET_HOSTS
    through_lb: bool = False

    @property
    def load_port(self) -> int:
        return LB_PORT

    @property
    def registry_repo(self) -> str:
        return f"{REGISTRY}/{self.name}"

    def pick_ports(self) -> dict[str, int]:
        used = set().union(*(listening_ports(h) for h in FLEET_HOSTS)) | {80}
        for _ in range(20):
            picked = free_ports(3)
            if not used & set(picked):
                break
        else:
            raise SetupError("no ports free here and on every fleet host")
        slots = dict(zip(("blue", "green"), picked[1:], strict=True))
        return {"proxy": 80 if self.through_lb else picked[0], **slots}

    def environment(self) -> dict:
        public = (f"http://127.0.0.1:{LB_PORT}" if self.through_lb
                  else f"http://10.77.0.{10 + int(self.hosts[0][-1])}:{self.ports['proxy']}")
        return {"hosts": [alias(h) for h in self.hosts], "remote_dir": self.remote_dir,
                "ports": dict(self.ports), "public_url": public,
                "proxy": {"bind": "0.0.0.0"},  # noqa: S104 - the hosts' own addresses
                "build": {"strategy": "registry", "registry": self.registry_repo}}

    def root_path(self, host: str, path: str | None = None) -> Path:
        """Where PATH (default the remote dir; under /srv) on `host` is, seen from here."""
        return FLEET_STATE_ROOT / host / (path or self.remote_dir).lstrip("/")

    # -- driving it --------------------------------------------------------------------------

    def deploy(self, *args: str, timeout: float = 900):
        return self.inv("deploy", f"--env={self.env}", "--yes", *args, timeout=timeout)

    def rollback(self, *args: str, timeout: float = 900):
        return self.inv("rollback", f"--env={self.env}", "--yes", *args, timeout=timeout)

    def slot_container(self, host: str, slot: str) -> str:
        out = run(docker_argv(host, "ps", "-aq", "--filter",
                              f"label=com.docker.compose.project={self.project}", "--filter",
                              f"label=com.docker.compose.service=app-{slot}"), timeout=60)
        ids = out.output.split()
        if out.returncode != 0 or len(ids) != 1:
            raise SetupError(f"{host}: no single app-{slot} container ({ids})")
        return ids[0]

    def boot_to_healthy(self, host: str, slot: str, runs: int = 3) -> float:
        """The app's own start-to-healthy time on `host`: `docker compose start` of the stopped
        slot, then its /health polled on the host's loopback every 50 ms (bounded: 60 s) until
        HTTP 2xx. Median of `runs`; the slot is stopped again after each run."""
        port = self.ports[slot]
        poll = ("i=0; while [ $i -lt 1200 ]; do "
                f"curl -fsS -m 1 -o /dev/null http://127.0.0.1:{port}/health && exit 0; "
                "sleep 0.05; i=$((i+1)); done; exit 1")
        container = self.slot_container(host, slot)
        times = []
        for _ in range(runs):
            started = time.monotonic()
            start = run(docker_argv(host, "start", container), timeout=120)
            if start.returncode != 0:
                raise SetupError(f"{host}: docker start app-{slot} failed:\n{start.tail()}")
            if run(in_netns(host, "sh", "-c", poll), timeout=90).returncode != 0:
                raise SetupError(f"{host}: app-{slot} did not become healthy within 60 s")
            times.append(time.monotonic() - started)
            run(docker_argv(host, "stop", "--time", "10", container), timeout=120)
        return sorted(times)[len(times) // 2]

    def wait_lb_serves(self, version: str, timeout_s: float = 90, streak: int = 30) -> float:
        """Until `streak` consecutive fresh requests through the load balancer answer 2xx with
        `version` (every host in HAProxy's rotation); bounded. Returns the seconds waited."""
        import http.client

        started = time.monotonic()
        good = 0
        while good < streak:
            if time.monotonic() - started > timeout_s:
                raise SetupError(f"the load balancer did not serve {version} {streak} times "
                                 f"in a row within {timeout_s:g} s")
            conn = http.client.HTTPConnection("127.0.0.1", LB_PORT, timeout=2)
            try:
                conn.request("GET", "/", headers={"Accept": "application/json",
                                                  "Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                served = json.loads(body).get("version") if body[:1] == b"{" else None
                good = good + 1 if 200 <= resp.status < 300 and served == version else 0
            except (OSError, http.client.HTTPException, ValueError, AttributeError):
                good = 0
            finally:
                conn.close()
            if good == 0:
                time.sleep(0.1)
        return time.monotonic() - started

    # -- cleanup -----------------------------------------------------------------------------

    def cleanup(self, *, keep_workdir: bool = False) -> list[str]:
        """Remove the run from every fleet host (containers, networks, volumes, images, remote
        directory), its database, its images here, its registry manifests. Returns, for what
        could not be removed, how to finish by hand."""
        leftovers: list[str] = []
        label = f"label=com.docker.compose.project={self.project}"
        if not re.fullmatch(r"bench-[0-9a-f]{8}", self.name):
            raise SetupError(f"refusing to clean up {self.name!r}")
        def pulled(docker: str) -> str:
            """The ids of the images of the run's registry repository (pulled by digest, they
            carry no tag of that name)."""
            awk = f'index($1, "{self.registry_repo}/") == 1 {{print $2}}'
            return (f"{docker} images --format '{{{{.Repository}}}} {{{{.ID}}}}' | "
                    f"awk {shlex.quote(awk)} | sort -u | xargs -r {docker} rmi -f >/dev/null")
        tags = [f"togather-server:{sha}" for sha in self.commits]
        for host in FLEET_HOSTS:  # every host: whatever a half-run left anywhere
            sock = FLEET_SOCK_ROOT / host / "docker.sock"
            docker = f"docker -H unix://{sock}"
            steps = [
                f"{docker} ps -aq --filter {label} | xargs -r {docker} rm -f >/dev/null",
                f"{docker} network ls -q --filter {label} | xargs -r {docker} network rm "
                ">/dev/null",
                f"{docker} volume ls -q --filter {label} | xargs -r {docker} volume rm "
                ">/dev/null",
                pulled(docker),
            ]
            if tags:
                steps.append(f"{docker} rmi {' '.join(tags)} >/dev/null 2>&1 || true")
            for step in steps:
                try:
                    ok = run(["bash", "-c", f"set -o pipefail; {step}"], timeout=300
                             ).returncode == 0
                except (SetupError, OSError):
                    ok = False
                if not ok:
                    leftovers.append(f"({host}) {step}")
            top = self.root_path(host, str(Path(self.remote_dir).parent))
            if top.exists():
                shutil.rmtree(top, ignore_errors=True)
                if top.exists():
                    leftovers.append(f"rm -rf {top}")
        leftovers += self.drop_database()
        # Here (root daemon): the local build and the tag it was pushed under.
        local = (f"{pulled('docker')}; "
                 + (f"docker rmi {' '.join(tags)} >/dev/null 2>&1; " if tags else "") + "true")
        run(["bash", "-c", local], timeout=300)
        leftovers += self.delete_from_registry()
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return leftovers

    def delete_from_registry(self) -> list[str]:
        """Delete the run's manifests (by digest; the registry's blobs go at its next garbage
        collection)."""
        leftovers = []
        repo = f"{self.name}/togather-server"
        for sha in self.commits:
            url = f"http://{REGISTRY}/v2/{repo}/manifests/{sha}"
            try:
                head = urllib.request.Request(url, method="HEAD",
                                              headers={"Accept": MANIFEST_TYPES})
                with urllib.request.urlopen(head, timeout=10) as resp:  # noqa: S310
                    digest = resp.headers.get("Docker-Content-Digest")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    continue  # never pushed (a failed run) or gone already
                leftovers.append(f"registry: {repo}:{sha} ({exc.code} on HEAD)")
                continue
            except OSError as exc:
                leftovers.append(f"registry: {repo}:{sha} ({exc})")
                continue
            try:
                delete = urllib.request.Request(
                    f"http://{REGISTRY}/v2/{repo}/manifests/{digest}", method="DELETE")
                with urllib.request.urlopen(delete, timeout=10):  # noqa: S310
                    pass
            except (OSError, urllib.error.HTTPError) as exc:
                leftovers.append(f"registry: {repo}@{digest} (DELETE: {exc})")
        return leftovers
