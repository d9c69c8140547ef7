"""Rollback, health, snapshots/restore, cleanup, hooks and webhooks on the real test bed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import PENDING_MIGRATION, DemoApp, WebhookReceiver, run


def deploy_ok(app: DemoApp, *args: str) -> subprocess.CompletedProcess:
    result = app.deploy(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def two_deploys(app: DemoApp) -> tuple[str, str]:
    first = app.head
    deploy_ok(app)
    second = app.commit("second", {"app/VERSION_NOTE": "2\n"})
    deploy_ok(app)
    return first, second


# --- rollback -------------------------------------------------------------------------------


def test_rollback_returns_traffic_to_the_previous_deployment(demo_app: DemoApp) -> None:
    first = demo_app.head
    deploy_ok(demo_app)
    # The second deploy migrates, so it takes a snapshot the rollback can point at.
    second = demo_app.commit("second", {"app/VERSION_NOTE": "2\n", **PENDING_MIGRATION})
    deploy_ok(demo_app)
    assert demo_app.served()[1]["version"] == second[:7]

    result = demo_app.inv("rollback", demo_app.env_flag)

    assert result.returncode == 0, result.stdout + result.stderr
    slot, version = demo_app.served()
    assert (slot, version["version"]) == ("blue", first[:7])
    state = demo_app.state()
    assert state["current_deployment"]["version"] == first[:7]
    assert state["current_deployment"]["rollback_count"] == 1
    assert state["current_deployment"]["active_slot"] == "blue"
    assert state["previous_deployment"]["version"] == second[:7]
    assert state["previous_deployment"]["status"] == "rolled_back"
    statuses = {e["version"]: e["status"] for e in state["deployment_history"]}
    assert statuses == {first[:7]: "active", second[:7]: "rolled_back"}
    assert state["lock"] == {"locked": False}
    assert "migrations are NOT rolled back" in result.stderr
    assert "db.restore" in result.stdout
    assert demo_app.container_state("green") == "exited"
    demo_app.assert_no_secrets()


def test_rollback_to_an_older_version_by_sha(demo_app: DemoApp) -> None:
    first, _ = two_deploys(demo_app)
    demo_app.commit("third", {"app/VERSION_NOTE": "3\n"})
    deploy_ok(demo_app)

    result = demo_app.inv("rollback", demo_app.env_flag, f"--to={first[:7]}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert demo_app.served()[1]["git_commit"] == first
    assert demo_app.state()["current_deployment"]["git_commit"] == first
    # No deploy since `first` had a pending migration: nothing to restore, and it says so.
    assert "NOT rolled back" not in result.stderr
    assert f"no deployment since {first[:7]} migrated the database" in result.stdout


def test_rollback_to_an_unknown_version_lists_the_available_ones(demo_app: DemoApp) -> None:
    first, second = two_deploys(demo_app)
    before = demo_app.state_bytes()

    result = demo_app.inv("rollback", demo_app.env_flag, "--to=deadbee")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "deadbee" in result.stderr and first[:7] in result.stderr
    assert demo_app.state_bytes() == before
    assert demo_app.served()[1]["version"] == second[:7]


def test_rollback_without_a_previous_deployment_exits_1(demo_app: DemoApp) -> None:
    deploy_ok(demo_app)

    result = demo_app.inv("rollback", demo_app.env_flag)

    assert result.returncode == 1
    assert "no previous deployment" in result.stderr
    assert demo_app.state()["lock"] == {"locked": False}


def test_rollback_rebuilds_a_removed_image(demo_app: DemoApp) -> None:
    first, _ = two_deploys(demo_app)
    old = f"togather-server:{first[:7]}"
    demo_app.compose("rm", "--force", "--stop", "app-blue", check=True)
    run(["docker", "image", "rm", old])
    assert run(["docker", "image", "inspect", old], check=False).returncode != 0

    result = demo_app.inv("rollback", demo_app.env_flag)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "rebuilding it from commit" in result.stderr
    assert demo_app.served()[1]["git_commit"] == first


def test_rollback_dry_run_changes_nothing(demo_app: DemoApp) -> None:
    _, second = two_deploys(demo_app)
    before = demo_app.state_bytes()

    result = demo_app.inv("rollback", demo_app.env_flag, "--dry-run")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "would roll back" in result.stdout
    assert demo_app.state_bytes() == before
    assert demo_app.served()[1]["version"] == second[:7]


# --- health ---------------------------------------------------------------------------------


def test_health_reports_each_check_and_exits_0(demo_app: DemoApp) -> None:
    deploy_ok(demo_app)

    table = demo_app.inv("health", demo_app.env_flag)
    as_json = demo_app.inv("health", demo_app.env_flag, "--json")

    assert table.returncode == 0, table.stdout + table.stderr
    for check in ("database", "migrations", "http_endpoint", "job_queue"):
        assert check in table.stdout
    doc = json.loads(as_json.stdout)
    assert doc["status"] == "healthy" and doc["ok"] is True
    assert doc["version"] == demo_app.head[:7]


def test_health_fails_on_an_unexpected_version_and_checks_one_slot(demo_app: DemoApp) -> None:
    deploy_ok(demo_app)

    wrong = demo_app.inv("health", demo_app.env_flag, "--expected-version=0000000")
    blue = demo_app.inv("health", demo_app.env_flag, "--slot=blue", "--json")
    green = demo_app.inv("health", demo_app.env_flag, "--slot=green")

    assert wrong.returncode == 4
    assert "expected" in wrong.stderr
    assert blue.returncode == 0 and json.loads(blue.stdout)["status"] == "healthy"
    assert green.returncode == 4  # nothing runs in green yet


# --- snapshots and restore ------------------------------------------------------------------


def test_snapshot_and_restore(demo_app: DemoApp) -> None:
    deploy_ok(demo_app)
    demo_app.psql("INSERT INTO events (title, starts_at) VALUES ('kept', now());")
    taken = demo_app.inv("db.snapshot", demo_app.env_flag)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    name = Path(taken.stdout.split()[1]).name
    demo_app.psql("DELETE FROM events; INSERT INTO events (title, starts_at) "
                  "VALUES ('lost', now());")

    listing = demo_app.inv("db.snapshots", demo_app.env_flag, "--json")
    restored = demo_app.inv("db.restore", demo_app.env_flag, f"--snapshot={name}", "--yes")

    assert name in [s["name"] for s in json.loads(listing.stdout)]
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert demo_app.psql("SELECT title FROM events ORDER BY 1;").split() == ["kept"]
    assert demo_app.state()["lock"] == {"locked": False}
    for snap in demo_app.snapshots():
        assert stat.S_IMODE(snap.stat().st_mode) == 0o600


def test_restore_refuses_unknown_or_hostile_snapshot_names(demo_app: DemoApp) -> None:
    deploy_ok(demo_app)
    for name in ("../../etc/passwd", "nope.dump", "staging_20260101T000000Z_abcdef0.dump"):
        result = demo_app.inv("db.restore", demo_app.env_flag, f"--snapshot={name}", "--yes")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr


# --- cleanup --------------------------------------------------------------------------------


def test_cleanup_never_removes_the_current_or_previous_image(demo_app: DemoApp) -> None:
    versions = [demo_app.head]
    deploy_ok(demo_app)
    for n in range(3):
        versions.append(demo_app.commit(f"v{n}", {"app/VERSION_NOTE": f"{n}\n"}))
        deploy_ok(demo_app)

    result = demo_app.inv("cleanup", demo_app.env_flag, "--keep-images=2")

    assert result.returncode == 0, result.stdout + result.stderr
    present = {v for v in versions
               if run(["docker", "image", "inspect", f"togather-server:{v[:7]}"],
                      check=False).returncode == 0}
    assert versions[-1] in present and versions[-2] in present
    assert versions[0] not in present
    assert demo_app.inv("rollback", demo_app.env_flag).returncode == 0


# --- hooks and webhooks ---------------------------------------------------------------------


HOOK = """#!/bin/sh
env | grep '^TOGATHER_' | sort > "{out}/{name}.env"
exit {code}
"""


def install_hook(app: DemoApp, name: str, out: Path, code: int = 0) -> None:
    path = app.path / "config" / "hooks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HOOK.format(out=out, name=name, code=code))
    path.chmod(0o755)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_hooks_run_with_togather_variables(demo_app: DemoApp, tmp_path: Path) -> None:
    for name in ("pre-deploy", "post-switch", "post-deploy"):
        install_hook(demo_app, name, tmp_path)

    deploy_ok(demo_app)

    post = read_env(tmp_path / "post-deploy.env")
    assert post["TOGATHER_ENVIRONMENT"] == demo_app.env
    assert post["TOGATHER_VERSION"] == demo_app.head[:7]
    assert post["TOGATHER_SLOT"] == "blue"
    assert post["TOGATHER_STATUS"] == "succeeded"
    assert post["TOGATHER_DEPLOYMENT_ID"] == demo_app.state()["current_deployment"]["id"]
    assert read_env(tmp_path / "post-switch.env")["TOGATHER_STATUS"] == "switched"
    for name in ("pre-deploy", "post-switch", "post-deploy"):
        demo_app.assert_no_secrets((tmp_path / f"{name}.env").read_text())


def test_failing_pre_deploy_hook_aborts_before_any_change(demo_app: DemoApp,
                                                          tmp_path: Path) -> None:
    install_hook(demo_app, "pre-deploy", tmp_path, code=3)

    result = demo_app.deploy()

    assert result.returncode == 1
    assert "hook pre-deploy failed" in result.stderr
    assert demo_app.state_bytes() is None
    assert demo_app.containers() == []


def test_failing_post_deploy_hook_does_not_undo_the_deploy(demo_app: DemoApp,
                                                          tmp_path: Path) -> None:
    install_hook(demo_app, "post-deploy", tmp_path, code=1)

    result = demo_app.deploy()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "hook post-deploy failed" in result.stderr
    assert demo_app.served()[1]["version"] == demo_app.head[:7]


def test_webhook_receives_the_events(demo_app: DemoApp, receiver: WebhookReceiver) -> None:
    demo_app.write_config(notifications={"webhook_url": receiver.url})
    deploy_ok(demo_app)
    demo_app.commit("second", {"app/VERSION_NOTE": "2\n"})
    deploy_ok(demo_app)
    demo_app.set_health_mode("crash")
    assert demo_app.deploy().returncode == 4
    assert demo_app.inv("rollback", demo_app.env_flag).returncode == 0

    kinds = [e["event"] for e in receiver.events]
    assert kinds.count("started") == 4
    assert kinds.count("completed") == 2
    assert kinds.count("failed") == 1
    assert kinds.count("rolled_back") == 1
    assert all(e["environment"] == demo_app.env for e in receiver.events)
    demo_app.assert_no_secrets(*(r.decode() for r in receiver.raw))


@pytest.mark.parametrize("receiver", [500], indirect=True)
def test_a_failing_webhook_never_fails_the_deploy(demo_app: DemoApp,
                                                 receiver: WebhookReceiver) -> None:
    demo_app.write_config(notifications={"webhook_url": receiver.url, "retries": 1})

    result = demo_app.deploy()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "webhook notification" in result.stderr
    assert len(receiver.events) >= 2  # retried
    assert os.path.exists(demo_app.state_path)


# --- build strategies -----------------------------------------------------------------------


def test_local_build_strategy_ships_the_image_over_ssh(demo_app: DemoApp) -> None:
    """`local`: build on this machine, then `docker save | docker load` through the SSH
    connection. The test bed's engine is this machine's own, so the load lands where the build
    happened; the run log shows the image went through `docker load` over the connection."""
    demo_app.write_config(build={"strategy": "local"})

    result = demo_app.deploy()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "built on togather-testbed" in result.stdout
    assert demo_app.served()[1]["git_commit"] == demo_app.head
    log = "\n".join(p.read_text() for p in demo_app.log_dir.glob("*.log"))
    assert "docker load --quiet" in log
    assert "ssh connections: 1" in result.stdout
