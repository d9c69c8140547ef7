"""Smoke test of the fleet fixtures (conftest.py: fleet_app / fleet_app_factory): the most basic
thing the product does on a fleet host today, a `remote`-strategy deploy of the demo to
togather-host1 alone (its own dockerd builds the image), served healthy by that host's proxy.

Skipped when the fleet is down; fails under CI=true with TOGATHER_FLEET=1 (.ci/run sets it).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("fleet_app", [{"hosts": ("host2",)}], indirect=True)
def test_fleet_app_cleans_up_on_its_host(fleet_app: Any) -> None:
    """Cheap check of the fixture's own plumbing (no deploy): ssh, per-host /srv, ports."""
    app = fleet_app
    app.ssh("host2", f"mkdir -p {app.remote_dir} && echo x > {app.remote_dir}/probe")
    assert (app.root_path("host2") / "probe").read_text() == "x\n"
    assert not (app.root_path("host1") / "probe").exists()
    assert app.url() == f"http://10.77.0.12:{app.ports['proxy']}"
    assert app.ports["proxy"] != 80
