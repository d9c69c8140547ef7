"""The switch without a reload, on the staging test bed (issue 10).

One client holds ONE keep-alive connection through the proxy during a deploy and a rollback:
the socket stays open, no request fails, and the same socket gets the new version after each
switch. nginx's worker processes are the same before and after (no reload), the switch state
survives `docker restart` of the proxy, and a host deployed by the previous version (upstream
file + bridge-network proxy) is taken over by the first deploy.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from togather_tasks import edge

# nginx's own behaviour (its worker processes, events file, pool); the HAProxy engine's
# counterparts are in test_haproxy_engine.
pytestmark = [pytest.mark.e2e, pytest.mark.proxy_engine("nginx")]

LEGACY = Path(__file__).parent / "legacy_proxy"
HOLD_MAX_SECONDS = 300  # the client's loop ends by then whatever happens
REQUEST_GAP = 0.02


def proxy_container(app) -> str:
    [proxy] = [c["id"] for c in app.containers()
               if c["service"] == "proxy" and c["state"] == "running"]
    return proxy


def worker_pids(app) -> set[str]:
    out = subprocess.run(["docker", "top", proxy_container(app), "-o", "pid,args"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    pids = {line.split()[0] for line in out.splitlines() if "worker process" in line}
    assert pids, out
    return pids


def established(destination: str) -> int:
    """Established TCP connections from this host (the proxy runs in its network namespace)
    to `destination` (address:port)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", "dst", destination],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return len(out.splitlines())


@dataclass
class HeldConnection:
    """GET /version over one keep-alive connection, again and again, until stopped. Never
    reconnects (auto_open off): a closed socket is an error, not a silent new connection."""

    port: int
    seen: list[tuple[str | None, str]] = field(default_factory=list)  # (slot, version) changes
    errors: list[str] = field(default_factory=list)
    local_ports: set[int] = field(default_factory=set)
    requests: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.conn.connect()
        self.conn.auto_open = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        deadline = time.monotonic() + HOLD_MAX_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.local_ports.add(self.conn.sock.getsockname()[1])
                self.conn.request("GET", "/version")
                resp = self.conn.getresponse()
                body = resp.read()
                self.requests += 1
                if resp.status != 200:
                    self.errors.append(f"HTTP {resp.status}")
                    continue
                label = (resp.getheader("X-Togather-Slot"), json.loads(body)["version"])
                if not self.seen or self.seen[-1] != label:
                    self.seen.append(label)
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            time.sleep(REQUEST_GAP)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.conn.close()


def test_one_keepalive_connection_survives_deploy_and_rollback_without_a_reload(
        demo_app) -> None:
    app = demo_app
    v1 = app.head[:7]
    app.deploy(check=True)
    slot, body = app.served()
    assert (slot, body["version"]) == ("blue", v1)
    workers = worker_pids(app)
    # proxy.workers unset: one nginx worker per four cores, at least one (togather-nginx).
    assert len(workers) == max(1, len(os.sched_getaffinity(0)) // 4), workers
    v2 = app.commit("v2", {"app/RELEASE": "v2\n"})[:7]

    held = HeldConnection(app.ports["proxy"])
    try:
        deployed = app.deploy()
        after_deploy = list(held.seen)
        # nginx reaches the new slot at its address on the edge network (edge.py), not
        # through the published port's userland forwarder.
        green = edge.slot_address(edge.derived_subnet(app.ports["blue"]), "green")
        pooled = (established(f"{green}:8080"), established(f"127.0.0.1:{app.ports['green']}"))
        rolled_back = app.inv("rollback", app.env_flag)
        time.sleep(0.5)
    finally:
        held.finish()

    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    assert held.errors == [], held.errors
    assert len(held.local_ports) == 1, "the client's connection was replaced"
    assert after_deploy[0] == ("blue", v1) and after_deploy[-1] == ("green", v2), after_deploy
    assert held.seen == [("blue", v1), ("green", v2), ("blue", v1)], held.seen
    assert held.requests > 100
    assert pooled[0] >= 1 and pooled[1] == 0, pooled
    assert worker_pids(app) == workers, "nginx was reloaded (its workers changed)"
    assert "reload" not in deployed.stderr + rolled_back.stderr
    # The slot the rollback left stopped gracefully: its idle keep-alive connections (the
    # proxy's pool) closed at once, no SIGKILL after the grace period.
    green = app.compose("logs", "--no-color", "app-green", check=True).stdout
    assert "SIGTERM received" in green and "idle connection(s)" in green, green[-2000:]
    assert green.rstrip().endswith("togather-demo: stopped"), green[-500:]
    [stopped] = [c["id"] for c in app.containers() if c["service"] == "app-green"]
    assert subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}", stopped],
                          capture_output=True, text=True, check=True).stdout.strip() == "0"


def time_waits(destination: str) -> int:
    """Sockets in TIME_WAIT on this host (the proxy's network namespace) to `destination`:
    what nginx leaves behind each time it closes an upstream connection."""
    out = subprocess.run(["ss", "-Htn", "state", "time-wait", "dst", destination],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return len(out.splitlines())


def test_many_clients_at_once_reuse_the_pool_without_churn(demo_app) -> None:
    """128 keep-alive clients at once through the proxy, four times nginx's old pool of 32 per
    worker. With that pool every request beyond it closed its upstream connection afterwards:
    thousands of sockets in TIME_WAIT within seconds, then the ephemeral ports ran out
    (1,206 req/s at 128 connections). The pool now keeps every connection it opened."""
    assert shutil.which("wrk"), "wrk is missing: make test installs it (make wrk)"
    app = demo_app
    app.deploy(check=True)
    blue = edge.slot_address(edge.derived_subnet(app.ports["blue"]), "blue")
    before = time_waits(f"{blue}:8080")
    run = subprocess.run(["wrk", "-t1", "-c128", "-d3s",
                          f"http://127.0.0.1:{app.ports['proxy']}/version"],
                         capture_output=True, text=True, timeout=60)
    opened = established(f"{blue}:8080")
    churned = time_waits(f"{blue}:8080") - before

    assert run.returncode == 0, run.stdout + run.stderr
    assert "Socket errors" not in run.stdout and "Non-2xx" not in run.stdout, run.stdout
    requests = int(run.stdout.split(" requests in ")[0].split()[-1])
    assert requests > 2000, run.stdout
    # The pool (proxy.keepalive, 1024 per worker) holds all of them: at most one upstream
    # connection per client connection per worker, and none closed.
    assert 1 <= opened <= 128 * len(worker_pids(app)), opened
    assert churned < 50, f"{churned} upstream connections closed for {requests} requests"
    # Room for the pool and the clients: the soft open-file limit raised to the hard one
    # (at most 65536) and worker_connections following it (togather-nginx).
    events = subprocess.run(["docker", "exec", proxy_container(app), "cat",
                             "/run/togather-events.conf"], capture_output=True, text=True,
                            timeout=30, check=True).stdout
    [pid] = sorted(worker_pids(app))[:1]
    [soft, hard] = next(line.split()[3:5] for line in
                        Path(f"/proc/{pid}/limits").read_text().splitlines()
                        if line.startswith("Max open files"))
    assert soft == hard or int(soft) == 65536, (soft, hard)
    assert events == f"worker_connections {max(256, min(16384, int(soft) - 64))};\n", events
    # The proxy's CPU cgroup is its own (/togather/<id> with Docker's cgroupfs driver), not
    # Docker's group shared by every container (commands.PROXY_CGROUP_PROBE).
    groups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    assert any(line.split(":", 2)[2].startswith("/togather/") for line in groups
               if line.split(":")[1] in ("cpu", "cpu,cpuacct", "")), groups


def send_body(port: int, size: int) -> int:
    """GET / with a body of `size` bytes through the proxy (the demo app reads and drops a
    body up to 64 MiB); the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/", body=b"x" * size)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_request_bodies_up_to_proxy_max_body_size_reach_the_app(demo_app) -> None:
    """nginx's own limit (1m) answered 413 to an upload the app accepts direct. The proxy now
    passes bodies up to proxy.max_body_size (100m by default) and refuses a larger one
    itself, before the app; changing it is a reload that names the change."""
    app = demo_app
    app.deploy(check=True)
    three_mib = 3 << 20
    assert send_body(app.ports["blue"], three_mib) == 200  # the app alone
    assert send_body(app.ports["proxy"], three_mib) == 200

    app.write_config(proxy={"max_body_size": "1m", "read_timeout": 30})
    app.commit("v2", {"app/RELEASE": "v2\n"})
    deployed = app.deploy(check=True)
    said = deployed.stdout + deployed.stderr
    assert "client_max_body_size 100m -> 1m" in said and "proxy_read_timeout 60s -> 30s" in said
    assert send_body(app.ports["proxy"], three_mib) == 413
    assert send_body(app.ports["proxy"], 1000) == 200
    assert send_body(app.ports["green"], three_mib) == 200  # refused by the proxy only


def wait_served(app, timeout: float = 20) -> tuple[str | None, dict]:
    """What the proxy serves, once it answers again (after a restart), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return app.served()
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_switch_state_survives_a_proxy_restart(demo_app) -> None:
    app = demo_app
    app.deploy(check=True)
    v2 = app.commit("v2", {"app/RELEASE": "v2\n"})[:7]
    app.deploy(check=True)
    assert (Path(app.remote_dir) / "nginx/state/green").exists()
    assert not (Path(app.remote_dir) / "nginx/state/blue").exists()

    subprocess.run(["docker", "restart", "--time", "2", proxy_container(app)], check=True,
                   capture_output=True, timeout=60)

    slot, body = wait_served(app)
    assert (slot, body["version"]) == ("green", v2)
    status = json.loads(app.inv("status", app.env_flag, "--json", check=True).stdout)
    assert [h["routes_to"] for h in status["hosts"].values()] == ["green"]


def _start_legacy_proxy(app) -> str:
    """What the previous version left on a host: its compose.yml, slots.env with the
    published port, nginx/upstream/active.conf routing to blue, and its proxy (built from its
    nginx.conf) on the project's bridge network. Returns the legacy image's tag."""
    root = Path(app.remote_dir)
    tag = "togather-proxy:legacy-e2e"
    subprocess.run(["docker", "build", "--quiet", "-t", tag, str(LEGACY / "nginx")],
                   check=True, capture_output=True, timeout=600)
    shutil.copy(LEGACY / "compose.yml", root / "compose.yml")
    env = (root / "slots.env").read_text()
    env = "".join(line + "\n" for line in env.splitlines()
                  if not line.startswith(("PROXY_IMAGE=", "PROXY_PORT=", "PROXY_BIND=")))
    (root / "slots.env").write_text(env + f"PROXY_IMAGE={tag}\nPROXY_PORT={app.ports['proxy']}\n"
                                    "PROXY_BIND=127.0.0.1\n")
    upstream = root / "nginx" / "upstream"
    upstream.mkdir(parents=True, exist_ok=True)
    (upstream / "active.conf").write_text(
        'map "" $togather_backend {\n    default app-blue:8080;\n}\n'
        'map "" $togather_slot {\n    default blue;\n}\n')
    for name in ("site.conf", "site.loaded", "verify.map"):
        (root / "nginx" / name).unlink()
    shutil.rmtree(root / "nginx" / "state")
    subprocess.run(["chown", "-R", "deploy:deploy", str(root)], check=True, timeout=30)
    app.compose("up", "--detach", "--no-deps", "--force-recreate", "proxy", check=True)
    return tag


@pytest.mark.proxy_engine("haproxy")  # the default: what an upgraded host meets
def test_a_host_deployed_by_the_previous_version_is_taken_over_by_the_next_deploy(
        demo_app) -> None:
    """e2e: the new version's first deploy meets an old-layout proxy and moves it over."""
    app = demo_app
    v1 = app.head[:7]
    app.deploy(check=True)
    tag = _start_legacy_proxy(app)
    mode = subprocess.run(["docker", "inspect", "--format", "{{.HostConfig.NetworkMode}}",
                           proxy_container(app)], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert mode != "host"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            served = app.served()
            break
        except (OSError, AssertionError):
            time.sleep(0.2)
    assert (served[0], served[1]["version"]) == ("blue", v1), "the legacy proxy does not serve"
    status = json.loads(app.inv("status", app.env_flag, "--json", check=True).stdout)
    assert [h["routes_to"] for h in status["hosts"].values()] == ["blue"]

    v2 = app.commit("v2", {"app/RELEASE": "v2\n"})[:7]
    result = app.deploy()

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"recreated (image {tag} -> togather-proxy:" in result.stderr
    assert f"network {mode} -> host" in result.stderr
    slot, body = app.served()
    assert (slot, body["version"]) == ("green", v2)
    root = Path(app.remote_dir)
    assert (root / "nginx/state/green").exists()
    assert not (root / "nginx/upstream").exists()
    assert subprocess.run(["docker", "inspect", "--format", "{{.HostConfig.NetworkMode}}",
                           proxy_container(app)], capture_output=True, text=True,
                          check=True).stdout.strip() == "host"
    # And the next one is a plain switch: nothing recreated or reloaded.
    app.commit("v3", {"app/RELEASE": "v3\n"})
    again = app.deploy()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "recreated" not in again.stderr and "reloaded" not in again.stderr
    assert app.served()[0] == "blue"


def test_an_edge_subnet_already_in_use_is_a_clear_error(demo_app) -> None:
    """Another network on the host holds the environment's derived /29: the deploy stops
    before anything is switched, names the subnet and proxy.subnet, and frees the lock; once
    the subnet is free the same deploy works."""
    app = demo_app
    subnet = str(edge.derived_subnet(app.ports["blue"]))
    squatter = f"e2e-{app.hex}-squatter"
    subprocess.run(["docker", "network", "create", "--subnet", subnet, squatter],
                   check=True, capture_output=True, timeout=60)
    try:
        result = app.deploy()
        assert result.returncode != 0
        said = result.stdout + result.stderr
        assert f"subnet {subnet} overlaps a network" in said, said
        assert "proxy.subnet" in said and "Traceback" not in said
    finally:
        subprocess.run(["docker", "network", "rm", squatter], check=True,
                       capture_output=True, timeout=60)
    app.deploy(check=True)
    assert app.served()[0] == "blue"
