"""Smoke test of the fleet fixtures (conftest.py: fleet_app / fleet_app_factory): the most basic
thing the product does on a fleet host today, a `remote`-strategy deploy of the demo to
togather-host1 alone (its own dockerd builds the image), served healthy by that host's proxy.

Skipped when the fleet is down; fails under CI=true with TOGATHER_FLEET=1 (.ci/run sets it).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest


def test_remote_deploy_to_one_fleet_host(fleet_app: Any, record_property: Any) -> None:
    app = fleet_app
    started = time.monotonic()
    app.deploy(check=True, timeout=1800)  # the first build on a fresh host runs apt
    elapsed = time.monotonic() - started
    record_property("fleet_deploy_seconds", round(elapsed, 1))
    print(f"\nfirst deploy to {app.primary}: {elapsed:.1f} s")

    # Served healthy by host1's own proxy, reached from the root namespace at 10.77.0.11.
    slot, version = app.served_by("host1")
    assert slot in ("blue", "green")
    assert version["git_commit"] == app.head, version
    status, _, body = app.host_get("host1", "/health")
    assert status == 200, body

    # Everything ran on host1: its daemon has the slot and the proxy, the others have nothing,
    # and the state file is on host1's private /srv (valid, the lock free).
    services = {c["service"]: c["state"] for c in app.containers("host1")}
    assert services.get(f"app-{slot}") == "running" and services.get("proxy") == "running", services
    for other in ("host2", "host3"):
        assert app.containers(other) == [], other
        assert app.state_bytes_on(other) is None, other
    state = app.state()  # validated against both schemas
    assert state is not None
    assert state["current_deployment"]["active_slot"] == slot, state
    assert state["current_deployment"]["status"] == "active", state
    assert state["lock"] == {"locked": False}
    assert app.inv("health", app.env_flag).returncode == 0
    app.assert_no_secrets()


def test_an_edge_subnet_a_host_route_covers_is_refused_before_anything_starts(
        fleet_app: Any) -> None:
    """Docker creates a bridge over a subnet the host already routes elsewhere (a VPN, an
    office network) without a word, and those addresses then go to the bridge. The deploy
    reads the host's routes before its edge network exists and stops. The route is added in
    host1's own network namespace (the test bed's), and removed after."""
    app = fleet_app
    third = app.ports["blue"] % 250
    subnet, route = f"10.250.{third}.8/29", f"10.250.{third}.0/24"
    app.write_config(environments={app.env: {"proxy": {"subnet": subnet}}})
    ip_route = ["nsenter", "--net=/run/netns/togather-host1", "ip", "route"]
    subprocess.run([*ip_route, "add", route, "dev", "lo"], check=True, timeout=30)
    try:
        refused = app.deploy(timeout=900)
    finally:
        subprocess.run([*ip_route, "del", route, "dev", "lo"], check=True, timeout=30)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said
    assert f"the edge network {subnet} of {app.env} would take over addresses" in said, said
    assert f"through its route '{route} dev lo scope link'" in said, said
    assert "proxy.subnet" in said and "Nothing was stopped" in said, said
    assert not [c for c in app.containers("host1") if c["service"].startswith("app-")]
    app.deploy(check=True, timeout=900)  # the route gone, the same subnet is fine


@pytest.mark.parametrize("fleet_app", [{"hosts": ("host2",)}], indirect=True)
def test_fleet_app_cleans_up_on_its_host(fleet_app: Any) -> None:
    """Cheap check of the fixture's own plumbing (no deploy): ssh, per-host /srv, ports."""
    app = fleet_app
    app.ssh("host2", f"mkdir -p {app.remote_dir} && echo x > {app.remote_dir}/probe")
    assert (app.root_path("host2") / "probe").read_text() == "x\n"
    assert not (app.root_path("host1") / "probe").exists()
    assert app.url() == f"http://10.77.0.12:{app.ports['proxy']}"
    assert app.ports["proxy"] != 80


def _fleet_deploy(app: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = app.deploy(timeout=1800)
    return result, time.monotonic() - start


@pytest.mark.parametrize("fleet_app", [{"hosts": ("host1", "host2")}], indirect=True)
def test_a_fleet_deploy_switches_both_hosts_and_a_failed_switch_is_undone_everywhere(
        fleet_app: Any) -> None:
    """Both hosts switch together; a switch that fails on host2 leaves both hosts on the old
    version with the new slot stopped and the lock free; the next deploy then works."""
    app = fleet_app
    first, seconds = _fleet_deploy(app)
    assert first.returncode == 0, first.stdout + first.stderr
    v1 = app.head[:7]
    for host, alias in zip(app.hosts, app.aliases, strict=True):
        slot, version = app.served_by(host)
        assert (slot, version["version"]) == ("blue", v1), (host, slot, version)
        assert f"{alias} ok" in first.stdout
    assert "(ssh connections: 2)" in first.stdout
    print(f"\nfirst fleet deploy (builds included): {seconds:.1f}s")

    v2 = app.commit("v2", {"app/VERSION_NOTE": "two\n"})[:7]
    # host2 cannot rename its slot marker: a directory is in the way (nginx, testing for a
    # regular file, keeps serving blue).
    blocker = f"{app.remote_dir}/nginx/state/green"
    app.ssh("host2", f"mkdir {blocker}")
    try:
        failed, _ = _fleet_deploy(app)
    finally:
        app.ssh("host2", f"rmdir {blocker}")

    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert "togather-host2" in failed.stderr
    assert "togather-host1: switched back to the blue slot" in failed.stderr
    for host in app.hosts:
        slot, version = app.served_by(host)
        assert (slot, version["version"]) == ("blue", v1), (host, slot, version)
        assert app.container_state("green", host) != "running", host
        assert app.container_state("blue", host) == "running", host
    doc = app.state()
    assert doc["lock"] == {"locked": False}
    assert doc["deployment_history"][0]["status"] == "failed"

    again, seconds = _fleet_deploy(app)
    assert again.returncode == 0, again.stdout + again.stderr
    for host in app.hosts:
        slot, version = app.served_by(host)
        assert (slot, version["version"]) == ("green", v2), (host, slot, version)
        assert app.container_state("blue", host) != "running", host
    print(f"fleet deploy, images built on both hosts: {seconds:.1f}s")
