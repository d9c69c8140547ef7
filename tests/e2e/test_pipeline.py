"""The deploy pipeline end to end (issue 3): real builds, real containers, real nginx switches,
real pg_dump/dbmate against real PostgreSQL, through `staging` over SSH unless stated."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

EXIT_HEALTH = 4
EXIT_MIGRATION = 5
BAD_MIGRATION = "db/migrations/20260201000000_bad.sql"


def deployed(app, result, *, slot: str, commit: str, history: int) -> dict:
    """Assert a successful deploy of `commit` into `slot`; returns the state."""
    assert result.returncode == 0, f"deploy failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    header, version = app.served()
    assert header == slot
    assert version["version"] == commit[:7]
    assert version["git_commit"] == commit
    state = app.state()
    current = state["current_deployment"]
    assert current["git_commit"] == commit
    assert current["version"] == commit[:7]
    assert current["active_slot"] == slot
    assert current["status"] == "active"
    assert current["health_status"] == "healthy"
    assert current["deployed_by"] == "e2e@example.com"
    assert state["lock"] == {"locked": False}
    assert len(state["deployment_history"]) == history
    assert state["deployment_history"][0]["id"] == current["id"]
    assert app.container_state(slot) == "running"
    assert app.container_state("proxy") == "running"
    return state


def assert_failed_deploy_left_old_version(app, result, *, code: int, old_commit: str,
                                          old_slot: str, new_slot: str) -> dict:
    """After a failed deploy: its exit code, traffic still on the old version, the new slot
    not running, the lock free, a `failed` history entry; returns the state."""
    output = result.stdout + result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{output}"
    assert "Traceback" not in output
    header, version = app.served()
    assert (header, version["git_commit"]) == (old_slot, old_commit)
    assert app.container_state(new_slot) != "running"
    assert app.container_state(old_slot) == "running"
    state = app.state()
    assert state["lock"] == {"locked": False}
    assert state["current_deployment"]["git_commit"] == old_commit
    assert state["current_deployment"]["active_slot"] == old_slot
    newest = state["deployment_history"][0]
    assert newest["status"] == "failed"
    assert newest["git_commit"] == app.head
    return state


@pytest.mark.parametrize("demo_app", ["staging", "development"], indirect=True)
def test_first_and_second_deploy(demo_app):
    """First deploy on an empty host goes to blue; the next commit goes to green, the first
    becomes `superseded` and its container is stopped but kept for rollback."""
    app = demo_app
    assert app.tree() is None
    first = app.head

    result = app.deploy()
    state = deployed(app, result, slot="blue", commit=first, history=1)
    assert state["environment"] == app.env
    assert state["previous_deployment"] is None
    assert state["current_deployment"]["migrations_run"] == 2
    assert Path(state["current_deployment"]["snapshot"]) in app.snapshots()
    root = Path(app.remote_dir)
    assert root.is_dir() and app.state_path.is_file() and app.snapshot_dir.is_dir()
    assert sorted(app.tables()) == ["events", "jobs", "schema_migrations"]
    assert "succeeded" in app.audit_log()
    logs = list(app.log_dir.glob(f"{app.env}_*.log"))
    assert logs, "no run log in TOGATHER_LOG_DIR"
    events = [json.loads(line)["event"] for line in logs[0].read_text().splitlines()]
    assert "step_done" in events

    second = app.commit("second version", {"app/NOTES.txt": "second\n"})
    result = app.deploy()
    state = deployed(app, result, slot="green", commit=second, history=2)
    previous = state["previous_deployment"]
    assert previous["git_commit"] == first
    assert previous["status"] == "superseded"
    assert previous["active_slot"] == "blue"
    assert state["deployment_history"][1]["status"] == "superseded"
    assert state["current_deployment"]["id"] > previous["id"]
    assert app.container_state("blue") == "exited"
    app.assert_no_secrets()


@pytest.mark.parametrize("mode", ["unhealthy", "crash"])
def test_failed_health_gate_keeps_old_version(demo_app, mode):
    """A new version that answers 503 (unhealthy) or dies at start (crash) never gets traffic:
    exit 4, the old slot keeps serving, the new slot is stopped, the failure is recorded."""
    app = demo_app
    first = app.head
    deployed(app, app.deploy(), slot="blue", commit=first, history=1)

    app.write_config(deployment={"health_check": {"retries": 8}})  # fail faster
    app.set_health_mode(mode)
    result = app.deploy()
    state = assert_failed_deploy_left_old_version(app, result, code=EXIT_HEALTH,
                                                  old_commit=first, old_slot="blue",
                                                  new_slot="green")
    assert "health" in result.stderr
    newest = state["deployment_history"][0]
    assert newest["active_slot"] == "green"
    assert state["previous_deployment"] is None
    assert len(state["deployment_history"]) == 2
    app.assert_no_secrets()


def test_failed_migration_exits_5_and_points_at_a_usable_snapshot(demo_app):
    """Invalid SQL in a migration: exit 5 before any container changes, traffic stays on the
    old version, and the snapshot taken just before is named with the restore command, exists
    on the host and restores into a scratch database."""
    app = demo_app
    first = app.head
    deployed(app, app.deploy(), slot="blue", commit=first, history=1)
    app.psql("INSERT INTO events (title, starts_at) VALUES ('kept by the snapshot', now());")

    app.commit("a broken migration",
               {BAD_MIGRATION: "-- migrate:up\nTHIS IS NOT SQL;\n-- migrate:down\n"})
    result = app.deploy()
    assert_failed_deploy_left_old_version(app, result, code=EXIT_MIGRATION, old_commit=first,
                                          old_slot="blue", new_slot="green")
    assert app.container_state("green") is None, "the new slot was started despite the failure"
    assert "db.restore" in result.stderr
    paths = re.findall(r"(/\S+\.dump)\b", result.stderr)
    assert paths, f"no snapshot path in stderr:\n{result.stderr}"
    snapshot = Path(paths[0])
    assert snapshot.parent == app.snapshot_dir
    assert app.head[:7] in snapshot.name
    assert snapshot.is_file()
    assert snapshot.name in result.stderr.split("db.restore", 1)[1]
    # The migration never half-applied: schema_migrations has the two good versions only.
    assert app.psql("SELECT version FROM schema_migrations ORDER BY 1;").split() == [
        "20260101000001", "20260101000002"]

    scratch = app.scratch_database()
    with snapshot.open("rb") as dump:
        restore = subprocess_run(["runuser", "-u", "postgres", "--", "pg_restore", "--no-owner",
                                  "--exit-on-error", "-d", scratch], stdin=dump)
    assert restore.returncode == 0, restore.stderr
    assert {"events", "jobs"} <= set(app.tables(scratch))
    rows = app_psql_db(scratch, "SELECT title FROM events;")
    assert "kept by the snapshot" in rows
    app.assert_no_secrets()


def stand_in_migrate(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """golang-migrate has no package on the test bed: a stand-in `migrate` on PATH satisfies
    the deploy's presence check and records any call (the tests assert it was never run).
    Returns the environment for `inv` and the marker file."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    called = tmp_path / "migrate-was-called"
    stub = bindir / "migrate"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {called}\necho 'stand-in: not run' >&2\n"
                    "exit 99\n")
    stub.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}, called


GOLANG_MIGRATE_TABLE = ("CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, "
                        "dirty boolean NOT NULL);\n")


def assert_refused_as_dirty(app, result, called: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_MIGRATION, output
    assert "Traceback" not in output
    assert "dirty" in result.stderr
    assert "force" in result.stderr, "the recovery command (migrate ... force) is not shown"
    assert "20260101000002" in result.stderr
    assert not called.exists(), "migrate was run against a dirty database"
    assert app.psql("SELECT version, dirty FROM schema_migrations;").split() == [
        "20260101000002|t"]


def test_golang_migrate_dirty_database_is_refused_on_a_fresh_host(demo_app_factory, tmp_path):
    """A database left dirty by golang-migrate (e.g. by the old bash tools) and a host where
    togather-tasks never ran: the deploy refuses at validation with exit 5 and the recovery
    command (`migrate ... force VERSION`), and changes nothing anywhere.

    Through `development` (host `local`) because of the stand-in `migrate` (see above)."""
    app = demo_app_factory("development")
    app.write_config(database={"migration_tool": "golang-migrate"}, commit=True)
    app.psql(GOLANG_MIGRATE_TABLE)
    app.psql("INSERT INTO schema_migrations VALUES (20260101000002, true);")
    tables_before = app.tables()
    env, called = stand_in_migrate(tmp_path)

    result = app.deploy(env=env, timeout=45)
    assert_refused_as_dirty(app, result, called)
    assert app.tree() is None, "the refused deploy created the remote directory"
    assert app.containers() == []
    assert app.tables() == tables_before
    app.assert_no_secrets()


def test_golang_migrate_dirty_database_is_refused_before_any_change(demo_app_factory,
                                                                    tmp_path):
    """An environment already deployed with golang-migrate whose database a failed migration
    left dirty: the next deploy refuses at validation (exit 5, `force` recovery shown) before
    any change: no snapshot, no new container, state file byte for byte unchanged, lock free.

    Through `development` (host `local`) because of the stand-in `migrate` (see above). The
    first deploy uses --skip-migrations after the schema was applied by hand, the way
    golang-migrate would have left it."""
    app = demo_app_factory("development")
    app.write_config(database={"migration_tool": "golang-migrate"}, commit=True)
    app.psql(GOLANG_MIGRATE_TABLE)
    for migration in sorted((app.path / "db" / "migrations").glob("*.sql")):
        app.psql(migration.read_text().split("-- migrate:up", 1)[1].split("-- migrate:down")[0])
    app.psql("INSERT INTO schema_migrations VALUES (20260101000002, false);")
    first = app.head
    deployed(app, app.deploy("--skip-migrations"), slot="blue", commit=first, history=1)

    app.psql("UPDATE schema_migrations SET dirty = true;")
    app.commit("second version", {"app/NOTES.txt": "second\n"})
    state_before, tree_before = app.state_bytes(), app.tree()
    env, called = stand_in_migrate(tmp_path)
    result = app.deploy(env=env, timeout=120)
    assert_refused_as_dirty(app, result, called)
    assert app.state_bytes() == state_before
    assert app.tree() == tree_before
    assert app.container_state("green") is None
    assert app.served()[1]["git_commit"] == first
    app.assert_no_secrets()


def test_dry_run_changes_nothing(demo_app):
    """`--dry-run` prints the plan (commands, no secrets) and changes nothing: not on a fresh
    host, not on a deployed one (files, mtimes, state bytes, containers, images, database)."""
    app = demo_app
    result = app.deploy("--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert app.tree() is None, "a dry run created the remote directory"
    assert app.containers() == []
    assert app.tables() == []
    assert not image_exists(f"togather-server:{app.head[:7]}")

    first = app.head
    deployed(app, app.deploy(), slot="blue", commit=first, history=1)
    second = app.commit("second version", {"app/NOTES.txt": "second\n"})

    def snapshot() -> dict:
        return {
            "tree": app.tree(),
            "state": app.state_bytes(),
            "containers": [(c["id"], c["state"], c["image"], container_started(c["id"]))
                           for c in app.containers()],
            "image": image_exists(f"togather-server:{second[:7]}"),
            "schema": dump_schema(app.database),
            "migrations": app.psql("SELECT version FROM schema_migrations ORDER BY 1;"),
            "proxy": (sorted(p.name for p in (Path(app.remote_dir) / "nginx/state").iterdir()),
                      (Path(app.remote_dir) / "nginx/site.conf").read_text()),
        }

    before = snapshot()
    assert before["image"] is False
    result = app.deploy("--dry-run")
    after = snapshot()
    assert result.returncode == 0, result.stdout + result.stderr
    assert after == before
    assert app.served()[0] == "blue"
    plan = result.stdout
    assert "dry run" in plan
    assert second[:7] in plan
    for command in ("docker build", "pg_dump", "dbmate", "docker compose", "app-green",
                    "nginx"):
        assert command in plan, f"{command!r} missing from the plan:\n{plan}"
    app.assert_no_secrets()


def test_port_in_use_fails_at_start_and_kills_nothing(demo_app):
    """Something else listens on the green port: the deploy fails at `start`, names the port,
    leaves that listener alone and traffic on the old version."""
    app = demo_app
    first = app.head
    deployed(app, app.deploy(), slot="blue", commit=first, history=1)
    port = app.ports["green"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(8)
        app.commit("second version", {"app/NOTES.txt": "second\n"})
        result = app.deploy()
        assert_failed_deploy_left_old_version(app, result, code=1, old_commit=first,
                                              old_slot="blue", new_slot="green")
        assert re.search(r"fail\w*\W.*\bstart\b", result.stderr, re.IGNORECASE), (
            f"the failed step (start) is not named:\n{result.stderr}")
        assert str(port) in result.stderr
        # The squatter still listens and answers.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = squatter.accept()
            conn.close()
    app.assert_no_secrets()


# --- helpers -----------------------------------------------------------------------------------

def subprocess_run(args, **kwargs):
    return subprocess.run(args, capture_output=True, timeout=120, cwd="/", check=False,
                          **kwargs)


def app_psql_db(database: str, sql: str) -> str:
    result = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-A", "-t",
                             "-v", "ON_ERROR_STOP=1", "-d", database], input=sql, text=True,
                            capture_output=True, timeout=60, cwd="/", check=True)
    return result.stdout


def dump_schema(database: str) -> str:
    """pg_dump --schema-only, without the per-run random \\restrict key lines."""
    result = subprocess.run(["runuser", "-u", "postgres", "--", "pg_dump", "--schema-only",
                             database], capture_output=True, text=True, timeout=60, cwd="/",
                            check=True)
    return "\n".join(line for line in result.stdout.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict")))


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          timeout=60, check=False).returncode == 0


def container_started(cid: str) -> str:
    return subprocess.run(["docker", "inspect", "--format",
                           "{{.State.StartedAt}} {{.RestartCount}}", cid], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()
