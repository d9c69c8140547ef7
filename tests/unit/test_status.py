"""`status` and `health` per host against in-memory hosts, and `--hosts` checked before any
connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from togather_tasks import commands as cmd
from togather_tasks import maintenance, status
from togather_tasks.config import Settings
from togather_tasks.errors import UsageError

from .fakehost import FakeSession, ok
from .test_fleet import SHA, simulate


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path) -> FakeSession:
    session = FakeSession(settings, tmp_path / "state", names=("web1", "web2"))
    for host in session.all_hosts:
        simulate(host, session.settings)
    simulate(session.host("web2"), session.settings, routes="green")
    return session


def test_each_host_says_where_its_proxy_routes_and_what_runs_in_each_slot(
        fleet: FakeSession) -> None:
    web1 = fleet.host("web1")
    layout = cmd.Layout(fleet.settings.remote_dir)
    web1.files[layout.slots_env] = b"BLUE_IMAGE=togather-server:0bd1234\nGREEN_IMAGE=x:none\n"

    per_host = {h.name: status.host_status(fleet.settings, h) for h in fleet.all_hosts}

    assert per_host["web1"] == {"routes_to": "blue", "slots": {
        "blue": {"image": "togather-server:0bd1234", "container": "running"},
        "green": {"image": None, "container": "running"}}, "maintenance": {"on": False}}
    assert per_host["web2"]["routes_to"] == "green"
    assert status.describe_hosts(per_host)[:3] == [
        "host web1: proxy -> blue",
        "  blue  running    togather-server:0bd1234",
        "  green running    -"]


def test_status_shows_maintenance_with_its_message_and_since_when(fleet: FakeSession) -> None:
    web2 = fleet.host("web2")
    layout = cmd.Layout(fleet.settings.remote_dir)
    web2.files[f"{layout.maintenance_link}/info.json"] = maintenance.info_json(
        maintenance.Notice("Back at 5", 120, "2026-12-06T07:00:00Z", "ops@example.com")).encode()

    per_host = {h.name: status.host_status(fleet.settings, h) for h in fleet.all_hosts}

    assert per_host["web2"]["maintenance"] == {
        "on": True, "message": "Back at 5", "retry_after": 120, "since": "2026-12-06T07:00:00Z",
        "by": "ops@example.com"}
    lines = status.describe_hosts(per_host)
    assert ("  maintenance on since 2026-12-06T07:00:00Z (by ops@example.com, Retry-After "
            "120s): Back at 5") in lines
    assert not any("maintenance" in line for line in lines[:3])  # web1: off, not shown


def test_a_host_without_a_slot_container_says_missing(fleet: FakeSession) -> None:
    fleet.host("web1").on("com.docker.compose.service=app-", ok(""))
    info = status.host_status(fleet.settings, fleet.host("web1"))
    assert info["slots"]["green"]["container"] == "missing"


def test_health_through_each_hosts_proxy(fleet: FakeSession) -> None:
    web2 = status.host_health(fleet.settings, fleet.host("web2"), "active", SHA[:7])
    web1 = status.host_health(fleet.settings, fleet.host("web1"), "active", SHA[:7])

    assert web2.verdict.status == "healthy" and web2.verdict.version == SHA[:7]
    assert web2.where == f"web2:127.0.0.1:{fleet.settings.ports['proxy']}/health"
    assert web1.verdict.status == "unhealthy"  # blue runs the old version
    assert web1.line("web1").startswith("host web1: unhealthy (HTTP 200, ")
    assert web1.as_dict(require_healthy=False)["ok"] is False


def test_hosts_option_names_hosts_of_the_environment_only(fleet: FakeSession) -> None:
    from togather_tasks.session import Session

    assert [h.name for h in Session.chosen_hosts(fleet, "web2")] == ["web2"]  # type: ignore[arg-type]
    assert len(Session.chosen_hosts(fleet, None)) == 2  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--hosts: web3 not in the staging environment"):
        Session.chosen_hosts(fleet, "web2,web3")  # type: ignore[arg-type]
