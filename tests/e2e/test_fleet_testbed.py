"""Smoke test of the fleet test bed (scripts/testbed-fleet.sh, `make testbed-fleet`).

Three hosts, each a network namespace with its own mount namespace, dockerd and sshd, reached
as the ssh aliases togather-host1..3; a registry (registry.togather.test:5000: 127.0.0.1 in the
root namespace, 10.77.0.1 on the hosts); HAProxy on 127.0.0.1:10080 over the hosts' port 80.

Skipped when the fleet is not up. With CI=true it fails instead, but only when TOGATHER_FLEET=1
(.ci/run sets it: `make testbed` starts the fleet).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from dotenv import dotenv_values

HOSTS = ("host1", "host2", "host3")
ALIASES = tuple(f"togather-{h}" for h in HOSTS)
ADDRS = {h: f"10.77.0.{10 + i}" for i, h in enumerate(HOSTS, start=1)}
GATEWAY = "10.77.0.1"
REGISTRY = "registry.togather.test:5000"
LB = ("127.0.0.1", 10080)
PROXY_PORT = 80
BASE_IMAGE = "debian:bookworm-slim"
ENV_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo" / "config" / "environments"


def ssh(alias: str, command: str, *, input: str | None = None, timeout: float = 60,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", alias, command],
        input=input, capture_output=True, text=True, timeout=timeout, check=check)


def run(*args: str, input: str | None = None, timeout: float = 120) -> str:
    return subprocess.run(list(args), input=input, capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def fleet_problems() -> list[str]:
    # Without the bridge, 10.77.0.x is not on this machine: never send it anything then.
    if not Path("/sys/class/net/tbbr0").exists():
        return ["no bridge tbbr0"]
    problems = []
    for alias in ALIASES:
        try:
            r = ssh(alias, "docker info --format '{{.ID}}'", timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"ssh {alias}: {exc}")
            continue
        if r.returncode != 0:
            problems.append(f"ssh {alias} docker info: {(r.stderr or r.stdout).strip()[-200:]}")
    return problems


@pytest.fixture(scope="module", autouse=True)
def fleet() -> None:
    problems = fleet_problems()
    if not problems:
        return
    reason = ("the fleet test bed is not up (`make testbed` starts it): "
              + "; ".join(problems))
    if os.environ.get("CI", "").lower() == "true" and os.environ.get("TOGATHER_FLEET") == "1":
        pytest.fail("CI=true, TOGATHER_FLEET=1 and " + reason, pytrace=False)
    pytest.skip(reason)


def test_each_alias_reaches_its_own_daemon() -> None:
    seen = {}
    for host, alias in zip(HOSTS, ALIASES, strict=True):
        out = ssh(alias, "hostname; docker info --format '{{.ID}} {{.DockerRootDir}}'").stdout
        name, ident, root = out.split()
        assert name == host
        assert root == f"/var/lib/togather-fleet/{host}/docker"
        seen[host] = ident
    root_id = run("docker", "info", "--format", "{{.ID}}").strip()
    assert len(set(seen.values()) | {root_id}) == len(HOSTS) + 1, seen


def test_each_host_sees_only_its_own_srv() -> None:
    name = f"fleet-e2e-{uuid.uuid4().hex[:8]}"
    try:
        ssh(ALIASES[0], f"mkdir /srv/togather/{name} && echo host1 > /srv/togather/{name}/who")
        assert ssh(ALIASES[0], f"cat /srv/togather/{name}/who").stdout == "host1\n"
        for alias in ALIASES[1:]:
            assert ssh(alias, f"test ! -e /srv/togather/{name}", check=False).returncode == 0, alias
        assert not Path("/srv/togather", name).exists()
        # ... and a container on host1 bind-mounting the host's /srv reads the host's file.
        out = ssh(ALIASES[0], f"docker run --rm -v /srv/togather/{name}:/x:ro {BASE_IMAGE} "
                              "cat /x/who").stdout
        assert out == "host1\n"
    finally:
        ssh(ALIASES[0], f"rm -rf /srv/togather/{name}", check=False)


def test_registry_push_from_root_and_pull_by_digest_on_host1() -> None:
    tag = uuid.uuid4().hex[:12]
    ref = f"{REGISTRY}/togather/fleet-e2e"
    run("docker", "build", "-q", "-t", f"{ref}:{tag}", "-",
        input=f"FROM {BASE_IMAGE}\nLABEL togather.e2e={tag}\n")
    digest = None
    try:
        run("docker", "push", "-q", f"{ref}:{tag}", timeout=300)
        digests = json.loads(run("docker", "image", "inspect", "-f", "{{json .RepoDigests}}",
                                 f"{ref}:{tag}"))
        digest = next(d.split("@", 1)[1] for d in digests if d.startswith(ref + "@"))
        ssh(ALIASES[0], f"docker pull -q {ref}@{digest}", timeout=300)
        fmt = "'{{index .Config.Labels \"togather.e2e\"}}'"
        label = ssh(ALIASES[0], f"docker image inspect -f {fmt} {ref}@{digest}").stdout.strip()
        assert label == tag
    finally:
        if digest:
            ssh(ALIASES[0], f"docker rmi -f {ref}@{digest} >/dev/null 2>&1 || true", check=False)
        subprocess.run(["docker", "rmi", "-f", f"{ref}:{tag}"], capture_output=True, check=False)


def test_host1_and_its_containers_reach_postgres() -> None:
    env_file = ENV_DIR / ".env.staging"
    if not env_file.is_file():
        pytest.skip(f"{env_file} missing (written by `make testbed`)")
    url = urlsplit(str(dotenv_values(env_file)["DEPLOY_DATABASE_URL"]))
    # The password travels on stdin into the remote shell's environment, never on a command line.
    lines = "\n".join([GATEWAY, str(url.port), unquote(url.username or ""),
                       unquote(url.password or ""), url.path.lstrip("/")]) + "\n"
    out = ssh(ALIASES[0], "read -r PGHOST; read -r PGPORT; read -r PGUSER; read -r PGPASSWORD; "
                          "read -r PGDATABASE; export PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE; "
                          "psql -X -Atc 'SELECT current_user, inet_client_addr()'",
              input=lines).stdout.strip()
    assert out == f"{unquote(url.username or '')}|{ADDRS['host1']}"
    out = ssh(ALIASES[0], f"docker run --rm {BASE_IMAGE} bash -c "
                          f"'exec 3<>/dev/tcp/{GATEWAY}/{url.port} && echo open'").stdout
    assert out == "open\n"


# ---------- the load balancer ----------

def _lb_get() -> tuple[int, str]:
    conn = http.client.HTTPConnection(*LB, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode().strip()
    finally:
        conn.close()


@pytest.fixture
def stand_in_proxies() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A tiny HTTP server per host on its proxy port (answers the host's name), run as root
    in the host's network namespace; stopped by pid afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (nsenter into the hosts' network namespaces)")
    for host in HOSTS:
        busy = run("nsenter", f"--net=/run/netns/togather-{host}", "ss", "-Hltn",
                   f"sport = :{PROXY_PORT}")
        if busy.strip():
            pytest.skip(f"port {PROXY_PORT} on {host} is in use (a deploy's proxy?)")
    server = ("import http.server,sys\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        b = sys.argv[2].encode(); self.send_response(200)\n"
              "        self.send_header('Content-Length', str(len(b))); self.end_headers()\n"
              "        self.wfile.write(b)\n"
              "    def log_message(self, *a): pass\n"
              "http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[3])), H)"
              ".serve_forever()\n")
    procs = {h: subprocess.Popen(["nsenter", f"--net=/run/netns/togather-{h}", "python3", "-c",
                                  server, ADDRS[h], h, str(PROXY_PORT)])
             for h in HOSTS}
    try:
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def test_load_balancer_spreads_and_skips_a_dead_host(
        stand_in_proxies: dict[str, subprocess.Popen[bytes]]) -> None:
    # HAProxy's active checks bring each host up after 2 good checks (1 s apart).
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while seen != set(HOSTS) and time.monotonic() < deadline:
        status, body = _lb_get()
        if status == 200:
            seen.add(body)
        time.sleep(0.1)
    assert seen == set(HOSTS)

    # host2 dies: not one request fails (refused connects are retried on another host).
    stand_in_proxies["host2"].send_signal(signal.SIGTERM)
    stand_in_proxies["host2"].wait(timeout=10)
    answers = [_lb_get() for _ in range(30)]
    assert all(status == 200 for status, _ in answers), answers
    assert {body for _, body in answers} == {"host1", "host3"}
