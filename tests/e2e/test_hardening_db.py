"""Issue 8, the database items on the real test bed: a restore returns the database exactly to
the snapshot (21), `rollback --restore-db` refuses before any change without confirmation
(22) and restores first, inside the rollback's own lock (5, 23), and a rollback refused by a
schema the old version cannot run on names the snapshot and the command that fixes it (23);
the snapshot being restored is never pruned (3) and belongs to this environment (17)."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import DemoApp

TAGS_MIGRATION = {
    "db/migrations/20260101000003_create_tags.sql": (
        "-- migrate:up\n"
        "CREATE TABLE tags (id bigserial PRIMARY KEY, name text NOT NULL);\n"
        "CREATE SCHEMA reporting;\n"
        "CREATE TABLE reporting.daily (day date PRIMARY KEY);\n"
        "-- migrate:down\n"
        "DROP SCHEMA reporting CASCADE;\n"
        "DROP TABLE tags;\n"),
}
PAUSED = r"togather: paused before restore_database \(pid (\d+)\)"


def deploy_ok(app: DemoApp, *args: str) -> subprocess.CompletedProcess:
    result = app.deploy(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def deploy_then_migrate(app: DemoApp) -> tuple[str, str, Path]:
    """Deploy the demo, then a commit whose migration adds a table and a schema; returns
    both SHAs and the snapshot taken before that migration."""
    first = app.head
    deploy_ok(app)
    second = app.commit("a migration adds tags and a reporting schema", TAGS_MIGRATION)
    deploy_ok(app)
    snapshot = app.state()["current_deployment"]["snapshot"]
    return first, second, Path(snapshot)


def applied_migrations(app: DemoApp) -> list[str]:
    return app.psql("SELECT version FROM schema_migrations ORDER BY 1;").split()


def schemas(app: DemoApp) -> list[str]:
    return app.psql("SELECT nspname || ':' || nspowner::regrole FROM pg_namespace "
                    "WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' "
                    "ORDER BY 1;").split()


def month_ago() -> str:
    """A snapshot timestamp older than the default retention (7 days)."""
    return (datetime.now(UTC) - timedelta(days=30)).strftime("%Y%m%dT%H%M%SZ")


def copy_snapshot(source: Path, name: str) -> Path:
    """A copy of `source` under another name, owned like it (the deploy user's)."""
    target = source.with_name(name)
    shutil.copy2(source, target)
    st = source.stat()
    os.chown(target, st.st_uid, st.st_gid)
    return target


def test_restore_leaves_exactly_the_snapshot_and_the_version_redeploys(
        demo_app: DemoApp) -> None:
    """Item 21: pg_restore --clean left `tags` behind; the next deploy of the same version then
    failed with exit 5 (relation "tags" already exists). A snapshot that breaks off half way
    still changes nothing."""
    _, _, snapshot = deploy_then_migrate(demo_app)
    assert "tags" in demo_app.tables()
    before_migration = ["20260101000001", "20260101000002"]

    truncated = copy_snapshot(snapshot, f"{demo_app.env}_{month_ago()}_{snapshot.name[-12:]}")
    truncated.write_bytes(snapshot.read_bytes()[:snapshot.stat().st_size // 2])

    broken = demo_app.inv("db.restore", demo_app.env_flag, f"--snapshot={truncated.name}",
                          "--yes")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "database is unchanged" in broken.stderr
    assert "tags" in demo_app.tables()
    assert len(applied_migrations(demo_app)) == 3

    restored = demo_app.inv("db.restore", demo_app.env_flag, f"--snapshot={snapshot.name}",
                            "--yes")

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert demo_app.tables() == ["events", "jobs", "schema_migrations"]
    assert schemas(demo_app) == ["public:pg_database_owner"]
    assert applied_migrations(demo_app) == before_migration
    assert demo_app.state()["lock"] == {"locked": False}
    redeploy = deploy_ok(demo_app)
    assert "tags" in demo_app.tables(), redeploy.stdout
    assert applied_migrations(demo_app) == [*before_migration, "20260101000003"]
    demo_app.assert_no_secrets()


def test_rollback_restore_db_without_confirmation_changes_nothing(demo_app: DemoApp) -> None:
    """Item 22: without a terminal and without --yes the rollback used to switch traffic and
    rewrite the state, and only then refuse the restore."""
    _, second, _ = deploy_then_migrate(demo_app)
    state_before = demo_app.state_bytes()

    result = demo_app.inv("rollback", demo_app.env_flag, "--restore-db")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs --yes" in result.stderr and "Traceback" not in result.stderr
    slot, version = demo_app.served()
    assert (slot, version["version"]) == ("green", second[:7])
    assert demo_app.state_bytes() == state_before
    assert "tags" in demo_app.tables()


def test_rollback_onto_a_schema_the_old_version_refuses(demo_app: DemoApp,
                                                        tmp_path: Path) -> None:
    """Item 23 (and 5): the old version refuses the newer schema. A plain rollback fails its
    health gate and names the snapshot and `inv rollback --restore-db`; that command then
    restores first, while the rollback holds its lock and traffic is still on the new version,
    and the old version comes back healthy on its own schema."""
    demo_app.write_config(deployment={"health_check": {"retries": 6}})
    first = demo_app.set_health_mode("schema-exact")
    _, second, snapshot = deploy_then_migrate(demo_app)
    first_id = demo_app.state()["previous_deployment"]["id"]

    plain = demo_app.inv("rollback", demo_app.env_flag)

    assert plain.returncode == 4, plain.stdout + plain.stderr
    assert str(snapshot) in plain.stderr
    assert f"inv rollback --env={demo_app.env} --restore-db" in plain.stderr
    assert demo_app.served()[1]["version"] == second[:7]

    hold = tmp_path / "hold"
    hold.touch()
    running = demo_app.spawn("rollback", demo_app.env_flag, "--restore-db", "--yes",
                             env={"TOGATHER_TEST_PAUSE_BEFORE": "restore_database",
                                  "TOGATHER_TEST_PAUSE_FILE": str(hold)})
    running.wait_for_stdout(PAUSED)
    lock = demo_app.state()["lock"]
    assert lock["locked"] and lock["deployment_id"] == first_id, lock
    assert demo_app.served()[1]["version"] == second[:7]
    assert "tags" in demo_app.tables()
    hold.unlink()
    result = running.wait()

    assert result.returncode == 0, result.stdout + result.stderr
    assert demo_app.served()[1]["version"] == first[:7]
    assert "tags" not in demo_app.tables()
    assert applied_migrations(demo_app) == ["20260101000001", "20260101000002"]
    state = demo_app.state()
    assert state["current_deployment"]["version"] == first[:7]
    assert state["lock"] == {"locked": False}
    assert "NOT rolled back" not in result.stderr
    demo_app.assert_no_secrets()


def test_restore_keeps_its_old_snapshot_and_refuses_another_environments(
        demo_app: DemoApp) -> None:
    """Item 3: the safety snapshot's retention pass deleted a target older than the retention
    period before pg_restore could read it. Item 17: a snapshot named for another environment
    was restored into this one."""
    deploy_ok(demo_app)
    [taken] = demo_app.snapshots()
    sha7 = taken.name.rsplit("_", 1)[1].removesuffix(".dump")
    old = copy_snapshot(taken, f"{demo_app.env}_{month_ago()}_{sha7}.dump")
    foreign = copy_snapshot(taken, f"production_{month_ago()}_{sha7}.dump")

    restored = demo_app.inv("db.restore", demo_app.env_flag, f"--snapshot={old.name}", "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert old.exists()

    refused = demo_app.inv("db.restore", demo_app.env_flag, f"--snapshot={foreign.name}",
                           "--yes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "snapshot of the production environment" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert demo_app.state()["lock"] == {"locked": False}
