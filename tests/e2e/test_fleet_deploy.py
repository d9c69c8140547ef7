"""Deploys to two real fleet hosts (togather-host1, togather-host2: own network namespace,
dockerd and sshd each; see scripts/testbed-fleet.sh): both hosts switch together, and a switch
that fails on host 2 leaves both hosts on the old version with the new slot stopped, the lock
free; the next deploy then works. Skipped when the fleet is not up.

The app is the usual DemoApp, reconfigured for the two hosts: its own ports on them, the
database at the bridge address the hosts reach, and a teardown of its own on each host (the
DemoApp's teardown only knows this machine)."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

HOSTS = ("togather-host1", "togather-host2")
ADDRESSES = {"togather-host1": "10.77.0.11", "togather-host2": "10.77.0.12"}
DATABASE_HOST = "10.77.0.1"  # PostgreSQL as the fleet hosts (and their containers) see it


def ssh(alias: str, command: str, *, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", alias,
                           command], capture_output=True, text=True, timeout=timeout,
                          check=check)


def fleet_is_up() -> bool:
    if not Path("/sys/class/net/tbbr0").exists():
        return False
    try:
        return all(ssh(alias, "docker info --format '{{.ID}}'", timeout=20,
                       check=False).returncode == 0 for alias in HOSTS)
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not fleet_is_up(), reason="the fleet test bed is not up")]


def on_database_host(url: str) -> str:
    parts = urlsplit(url)
    netloc = re.sub(r"@[^@:/]+", f"@{DATABASE_HOST}", parts.netloc)
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def fleet_app(demo_app) -> Iterator:
    """The DemoApp deployed to host1 and host2 instead of the test bed's single host."""
    app = demo_app
    for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
        app.secrets[key] = on_database_host(app.secrets[key])
    text = app.env_file.read_text()
    for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
        text = re.sub(rf"^{key}=.*$", f"{key}={app.secrets[key]}", text, flags=re.M)
    app.env_file.write_text(text)
    app.write_config(
        proxy={"bind": "0.0.0.0"},
        environments={"staging": {"hosts": list(HOSTS),
                                  "public_url": f"http://10.77.0.11:{app.ports['proxy']}"}})
    yield app
    for alias in HOSTS:
        ssh(alias, f"cd {app.remote_dir} 2>/dev/null && docker compose --project-name "
                   f"{app.project} --file compose.yml --env-file slots.env down "
                   f"--remove-orphans --timeout 2; rm -rf {Path(app.remote_dir).parent}",
            check=False)


def served(app, alias: str) -> tuple[str | None, str | None]:
    """(slot, version) that `alias`'s proxy answers with, seen from this machine."""
    conn = http.client.HTTPConnection(ADDRESSES[alias], app.ports["proxy"], timeout=5)
    try:
        conn.request("GET", "/version")
        resp = conn.getresponse()
        body = resp.read()
        slot = resp.getheader("x-togather-slot")
    except OSError:
        return None, None
    finally:
        conn.close()
    try:
        return slot, json.loads(body).get("version")
    except ValueError:
        return slot, None


def running(app, alias: str, slot: str) -> bool:
    out = ssh(alias, f"docker ps --filter label=com.docker.compose.project={app.project} "
                     f"--filter label=com.docker.compose.service=app-{slot} -q").stdout
    return bool(out.strip())


def state(app) -> dict:
    return json.loads(ssh(HOSTS[0], f"cat {app.remote_dir}/deployment-state.json").stdout)


def deploy(app, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = app.deploy(*args, timeout=1500)
    return result, time.monotonic() - start


def test_a_fleet_deploy_switches_both_hosts_and_a_failed_switch_is_undone_everywhere(
        fleet_app, assert_state_valid: Callable) -> None:
    app = fleet_app
    first, seconds = deploy(app)
    assert first.returncode == 0, first.stdout + first.stderr
    v1 = app.head[:7]
    for alias in HOSTS:
        assert served(app, alias) == ("blue", v1)
        assert f"{alias} ok" in first.stdout
    assert "(ssh connections: 2)" in first.stdout
    print(f"first fleet deploy (builds included): {seconds:.1f}s")

    v2 = app.commit("v2", {"app/VERSION_NOTE": "two\n"})[:7]
    upstream_dir = f"{app.remote_dir}/nginx/upstream"
    ssh(HOSTS[1], f"chmod 555 {upstream_dir}")  # host2 cannot write its new upstream
    try:
        failed, _ = deploy(app)
    finally:
        ssh(HOSTS[1], f"chmod 755 {upstream_dir}")

    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert "togather-host2" in failed.stderr
    assert "togather-host1: switched back to the blue slot" in failed.stderr
    for alias in HOSTS:
        assert served(app, alias) == ("blue", v1)
        assert not running(app, alias, "green")
        assert running(app, alias, "blue")
    doc = state(app)
    assert_state_valid(doc)
    assert doc["lock"] == {"locked": False}
    assert doc["deployment_history"][0]["status"] == "failed"

    again, seconds = deploy(app)
    assert again.returncode == 0, again.stdout + again.stderr
    for alias in HOSTS:
        assert served(app, alias) == ("green", v2)
        assert not running(app, alias, "blue")
    print(f"fleet deploy, images built on both hosts: {seconds:.1f}s")
