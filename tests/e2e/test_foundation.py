"""Foundation end to end (issue 2): the environment lock kept in the state file on the host,
its release on every exit path and takeover when stale, and the SSH hardening (host keys,
authentication, reachability). Real processes, real sshd, real state file on the host."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

EXIT_LOCK_HELD = 3
PAUSED = r"togather: paused before (\w+) \(pid (\d+)\)"


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lock_of(app) -> dict:
    state = app.state()
    assert state is not None, "no state file on the host"
    return state["lock"]


def assert_lock_free(app) -> dict:
    state = app.state()
    assert state is not None, "no state file on the host"
    assert state["lock"] == {"locked": False}, state["lock"]
    return state


def assert_held(result, *, holder: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_LOCK_HELD, f"exit {result.returncode}:\n{output}"
    assert "Traceback" not in output
    assert holder in result.stderr, f"holder {holder} not named:\n{result.stderr}"
    assert "--force" in result.stderr, f"no hint on breaking the lock:\n{result.stderr}"


# --- the lock between processes -------------------------------------------------------------

def test_manual_lock_blocks_other_processes_until_released(demo_app):
    """A lock taken by `lock.acquire` in one process blocks `deploy` and `lock.acquire` in
    others (exit 3, holder named); another operator cannot release it without --force; its
    holder can; `lock.status --json` shows the lock object."""
    app = demo_app
    flag = app.env_flag
    held = app.inv("lock.acquire", flag, "--message=maint")
    assert held.returncode == 0, held.stdout + held.stderr

    status = app.inv("lock.status", flag, "--json")
    assert status.returncode == 0, status.stderr
    lock = json.loads(status.stdout)
    assert lock["locked"] is True
    assert lock["locked_by"] == "e2e@example.com"
    assert lock["message"] == "maint"
    assert re.fullmatch(r"lock_[0-9A-HJKMNP-TV-Z]{26}", lock["lock_id"])
    assert lock == lock_of(app)

    deploy = app.deploy()
    assert_held(deploy, holder="e2e@example.com")
    assert "maint" in deploy.stderr
    again = app.inv("lock.acquire", flag, "--message=me too")
    assert_held(again, holder="e2e@example.com")
    assert lock_of(app) == lock, "a refused process changed the lock"
    assert len(app.state()["deployment_history"]) == 0

    # Another operator (a different git e-mail) may not release it without --force.
    other = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "user.email",
             "GIT_CONFIG_VALUE_0": "other@example.com"}
    stolen = app.inv("lock.release", flag, env=other)
    assert_held(stolen, holder="e2e@example.com")
    assert lock_of(app) == lock

    released = app.inv("lock.release", flag)
    assert released.returncode == 0, released.stdout + released.stderr
    assert_lock_free(app)
    status = app.inv("lock.status", flag, "--json")
    assert json.loads(status.stdout) == {"locked": False}
    app.assert_no_secrets()


def test_two_simultaneous_deploys_exactly_one_proceeds(demo_app):
    app = demo_app
    first, second = app.spawn("deploy", app.env_flag), app.spawn("deploy", app.env_flag)
    results = [first.wait(), second.wait()]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, EXIT_LOCK_HELD], "\n".join(r.stdout + r.stderr for r in results)
    loser = next(r for r in results if r.returncode == EXIT_LOCK_HELD)
    assert_held(loser, holder="e2e@example.com")
    state = assert_lock_free(app)
    assert len(state["deployment_history"]) == 1
    assert state["current_deployment"]["active_slot"] == "blue"
    assert app.served()[0] == "blue"
    app.assert_no_secrets()


# --- release on signals, takeover when stale ------------------------------------------------

@pytest.mark.parametrize(("signame", "step"), [("SIGTERM", "build"), ("SIGINT", "health"),
                                               ("SIGTERM", "switch")])
def test_signal_releases_the_lock_and_records_the_failure(demo_app, signame, step):
    """SIGTERM/SIGINT while a deploy holds the lock: it exits non-zero, the lock is free, the
    history has the failed deployment, the state is valid, and a new slot it started is stopped
    with traffic unchanged."""
    app = demo_app
    running = app.spawn("deploy", app.env_flag, env={"TOGATHER_TEST_PAUSE_BEFORE": step})
    paused = running.wait_for_stdout(PAUSED, timeout=180)
    assert paused.group(1) == step
    assert int(paused.group(2)) == running.pid
    holding = lock_of(app)
    assert holding["locked"] is True and holding["pid"] == running.pid

    running.send(getattr(signal, signame))
    result = running.wait(timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, None), output
    assert "Traceback" not in output
    assert signame in result.stderr

    state = assert_lock_free(app)
    assert state["current_deployment"] is None
    newest = state["deployment_history"][0]
    assert newest["status"] == "failed"
    assert newest["git_commit"] == app.head
    assert newest["id"] == holding["deployment_id"]
    assert app.container_state("blue") in (None, "exited", "created")
    app.assert_no_secrets()


def test_lock_of_a_killed_deploy_is_taken_over(demo_app):
    """SIGKILL leaves the lock behind; its holder is provably gone (same machine, dead pid), so
    the next deploy takes it over with a warning naming the old holder, and succeeds."""
    app = demo_app
    running = app.spawn("deploy", app.env_flag, env={"TOGATHER_TEST_PAUSE_BEFORE": "build"})
    running.wait_for_stdout(PAUSED, timeout=180)
    running.send(signal.SIGKILL)
    assert running.wait(timeout=30).returncode == -signal.SIGKILL
    stale = lock_of(app)
    assert stale["locked"] is True and stale["pid"] == running.pid

    result = app.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    warning = [line for line in result.stderr.splitlines() if "took over" in line]
    assert warning, f"no takeover warning:\n{result.stderr}"
    assert "e2e@example.com" in warning[0] and str(running.pid) in warning[0]
    state = assert_lock_free(app)
    assert state["current_deployment"]["active_slot"] == "blue"
    assert app.served()[1]["git_commit"] == app.head
    app.assert_no_secrets()


def test_expired_lock_is_taken_over(demo_app, new_ulid):
    """A lock past lock_expires_at (holder on another machine, so its liveness is unknown) is
    stale: the next deploy takes it over with a warning naming the old holder."""
    app = demo_app
    now = datetime.now(UTC)
    app.put_state({
        "environment": app.env,
        "current_deployment": None,
        "previous_deployment": None,
        "deployment_history": [],
        "lock": {
            "locked": True,
            "lock_id": f"lock_{new_ulid()}",
            "locked_by": "gone@example.com",
            "locked_at": iso(now - timedelta(hours=2)),
            "lock_expires_at": iso(now - timedelta(hours=1, minutes=30)),
            "deployment_id": f"dep_{new_ulid()}",
            "pid": 4242,
            "hostname": "laptop-that-crashed.example.com",
        },
    })
    refused = app.inv("lock.status", app.env_flag)
    assert refused.returncode == 0 and "gone@example.com" in refused.stdout, refused.stdout

    result = app.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    warning = [line for line in result.stderr.splitlines() if "took over" in line]
    assert warning, f"no takeover warning:\n{result.stderr}"
    assert "gone@example.com" in warning[0]
    assert "expired" in warning[0]
    assert_lock_free(app)
    assert app.served()[0] == "blue"
    app.assert_no_secrets()


# --- SSH hardening ----------------------------------------------------------------------------

def ssh_config(tmp_path: Path, alias: str, *, port: int = 2222, identity: Path | None = None,
               known_hosts: Path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(f"""Host {alias}
  HostName 127.0.0.1
  Port {port}
  User deploy
  IdentityFile {identity or Path.home() / '.ssh' / 'togather_testbed_ed25519'}
  IdentitiesOnly yes
  UserKnownHostsFile {known_hosts}
  StrictHostKeyChecking yes
""")
    path.chmod(0o600)
    return path


def use_host(app, host: str) -> None:
    app.write_config(environments={app.env: {"hosts": [host]}})


def host_key_of_testbed() -> tuple[str, str]:
    """(key type, base64) of the test bed's sshd, from the known_hosts the test bed wrote."""
    line = (Path.home() / ".ssh" / "togather_testbed_known_hosts").read_text().split()
    return line[1], line[2]


def new_key(tmp_path: Path, name: str) -> Path:
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(key)],
                   check=True, capture_output=True, timeout=30)
    return key


def no_agent(config: Path) -> dict[str, str | None]:
    return {"TOGATHER_SSH_CONFIG": str(config), "SSH_AUTH_SOCK": None}


def test_unknown_and_changed_host_keys_are_refused_until_trusted(demo_app, tmp_path,
                                                                  cli_failure):
    app = demo_app
    alias = f"e2e-hostkey-{app.hex}"
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    env = no_agent(ssh_config(tmp_path, alias, known_hosts=known_hosts))
    use_host(app, alias)

    unknown = app.inv("lock.status", app.env_flag, env=env)
    cli_failure(unknown, contains="unknown host key")
    assert known_hosts.read_text() == "", "a refused key was recorded"

    key_type, real_key = host_key_of_testbed()
    impostor = new_key(tmp_path, "impostor").with_suffix(".pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:2222 {impostor[0]} {impostor[1]}\n")
    changed = app.inv("lock.status", app.env_flag, env=env)
    cli_failure(changed, contains="CHANGED")
    # Trusting new hosts never overrides a changed key.
    still = app.inv("hosts.trust", app.env_flag, "--yes", env=env)
    cli_failure(still, contains="CHANGED")
    assert real_key not in known_hosts.read_text()

    known_hosts.write_text("")
    trusted = app.inv("hosts.trust", app.env_flag, "--yes", env=env)
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    recorded = [line.split() for line in known_hosts.read_text().splitlines()]
    assert [key_type, real_key] in [fields[1:3] for fields in recorded], recorded
    assert any(fields[0] == "[127.0.0.1]:2222" for fields in recorded), recorded

    status = app.inv("lock.status", app.env_flag, env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "free" in status.stdout
    app.assert_no_secrets()


def test_wrong_ssh_key_is_a_one_line_authentication_error(demo_app, tmp_path, cli_failure):
    app = demo_app
    alias = f"e2e-badkey-{app.hex}"
    known_hosts = tmp_path / "known_hosts"
    shutil.copy(Path.home() / ".ssh" / "togather_testbed_known_hosts", known_hosts)
    stranger = new_key(tmp_path, "stranger")
    env = no_agent(ssh_config(tmp_path, alias, identity=stranger, known_hosts=known_hosts))
    use_host(app, alias)

    result = app.inv("lock.status", app.env_flag, env=env)
    cli_failure(result, contains="authentication")
    deploy = app.deploy(env=env)
    cli_failure(deploy, contains="authentication")
    assert app.tree() is None
    app.assert_no_secrets()


def test_unreachable_host_is_a_clear_error(demo_app, free_port, cli_failure):
    app = demo_app
    use_host(app, f"deploy@127.0.0.1:{free_port()}")
    result = app.inv("lock.status", app.env_flag)
    cli_failure(result, contains="cannot reach")
    deploy = app.deploy()
    cli_failure(deploy, contains="cannot reach")
    app.assert_no_secrets()


# --- the state file ---------------------------------------------------------------------------

def test_every_state_written_matches_the_original_schema(demo_app, compat_schema,
                                                         assert_state_valid):
    """Each operation leaves a state file the original tools' schema accepts (with `format`
    checks: e-mails, date-times), including the manual lock, a failure and a success."""
    app = demo_app
    flag = app.env_flag
    seen = []

    def check() -> None:
        doc = json.loads(app.state_bytes())
        assert_state_valid(doc)
        seen.append(doc)

    app.inv("lock.acquire", flag, "--message=schema check", check=True)
    check()
    assert seen[-1]["lock"]["locked"] is True
    app.inv("lock.release", flag, check=True)
    check()
    app.set_health_mode("crash")
    app.write_config(deployment={"health_check": {"retries": 6}})
    assert app.deploy().returncode == 4
    check()
    assert seen[-1]["deployment_history"][0]["status"] == "failed"
    app.set_health_mode("healthy")
    app.deploy(check=True)
    check()
    assert seen[-1]["current_deployment"]["status"] == "active"
    assert compat_schema["$defs"]["deployment_lock"]["required"] == ["locked"]
    app.assert_no_secrets()
