"""Issue 11, "Everyday commands", against the real test bed (staging over SSH): logs, exec,
audit, version, --lock-wait, pruning after each deploy and container log rotation."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

EXIT_INVALID = 2
EXIT_LOCK_HELD = 3


def exec_in_app(app, command: str, *args: str) -> subprocess.CompletedProcess:
    return app.inv("exec", app.env_flag, f"--command={command}", *args)


def say_in_app_log(app, text: str) -> None:
    """A line in the running app's own log (what its process writes to stderr), through
    `exec --slot=active`: the demo app logs nothing on demand."""
    result = exec_in_app(app, f"echo {text} > /proc/1/fd/2", "--slot=active")
    assert result.returncode == 0, result.stderr


def remote_processes(pattern: str) -> list[str]:
    """Processes on the test-bed host (this machine) whose command line matches."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True,
                         check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_logs_bounded_filtered_redacted_and_followed_until_ctrl_c(demo_app, cli_failure):
    app = demo_app
    assert app.deploy().returncode == 0
    secret = app.secrets["JWT_SECRET"]
    say_in_app_log(app, "marker-one token=$JWT_SECRET")
    say_in_app_log(app, "marker-two")

    shown = app.inv("logs", app.env_flag, "--lines=20")
    assert shown.returncode == 0, shown.stderr
    assert "marker-one token=***" in shown.stdout
    assert secret not in shown.stdout
    assert not re.search(r"^\[", shown.stdout, re.M), "one host: no host prefix"

    grepped = app.inv("logs", app.env_flag, "--grep=marker-two")
    assert grepped.stdout.strip().splitlines() == ["marker-two"]
    assert len(app.inv("logs", app.env_flag, "--lines=1").stdout.strip().splitlines()) == 1
    assert "marker-two" in app.inv("logs", app.env_flag, "--since=10m",
                                   "--slot=" + app.state()["current_deployment"]["active_slot"]
                                   ).stdout
    assert app.inv("logs", app.env_flag, "--slot=proxy").returncode == 0

    cli_failure(app.inv("logs", app.env_flag, "--slot=purple"), contains="--slot must be",
                code=EXIT_INVALID)
    cli_failure(app.inv("logs", app.env_flag, "--since=yesterday"), contains="--since",
                code=EXIT_INVALID)
    cli_failure(app.inv("logs", app.env_flag, "--hosts=elsewhere"), contains="--hosts",
                code=EXIT_INVALID)

    following = app.spawn("logs", app.env_flag, "--follow", "--lines=5")
    following.wait_for_stdout("marker-two", timeout=60)
    say_in_app_log(app, "marker-three")
    following.wait_for_stdout("marker-three", timeout=60)
    following.send(signal.SIGINT)
    result = following.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # Ctrl-C here must not leave `docker compose logs --follow` running on the host.
    deadline = time.monotonic() + 15
    while remote_processes(f"{app.project}.*logs.*--follow"):
        assert time.monotonic() < deadline, remote_processes(f"{app.project}.*logs")
        time.sleep(0.5)
    app.assert_no_secrets()


def test_app_and_proxy_containers_rotate_their_logs(demo_app):
    app = demo_app
    app.write_config(deployment={"log_rotation": {"max_size": "2m", "max_files": 3}})
    assert app.deploy().returncode == 0
    running = [c for c in app.containers() if c["state"] == "running"]
    assert {c["service"] for c in running} >= {"proxy"}
    assert len(running) == 2
    for container in running:
        out = subprocess.run(["docker", "inspect", "--format",
                              "{{json .HostConfig.LogConfig}}", container["id"]],
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == {"Type": "json-file",
                                   "Config": {"max-size": "2m", "max-file": "3"}}


def test_exec_passes_the_exit_status_through_one_off_and_in_the_active_slot(demo_app):
    app = demo_app
    assert exec_in_app(app, "true").returncode != 0, "nothing deployed yet: refused"
    assert app.deploy().returncode == 0
    before = {c["id"] for c in app.containers()}

    failed = exec_in_app(app, 'echo "on $ENVIRONMENT"; echo oops >&2; exit 7')
    assert failed.returncode == 7
    assert failed.stdout.strip() == f"on {app.env}"
    assert "oops" in failed.stderr
    assert {c["id"] for c in app.containers()} == before, "the one-off container is removed"

    quoted = exec_in_app(app, """printf '%s|' "a b" 'c"d' $((6*7))""")
    assert quoted.returncode == 0
    assert quoted.stdout.strip() == 'a b|c"d|42|'

    leaked = exec_in_app(app, "echo $JWT_SECRET")
    assert leaked.returncode == 0 and leaked.stdout.strip() == "***"

    slot = app.state()["current_deployment"]["active_slot"]
    inside = exec_in_app(app, 'echo "$TOGATHER_SLOT $$"; exit 4', "--slot=active")
    assert inside.returncode == 4
    assert inside.stdout.split()[0] == slot
    assert exec_in_app(app, "true", "--slot=old").returncode == EXIT_INVALID
    assert app.inv("exec", app.env_flag).returncode == EXIT_INVALID
    assert app.inv("-R", "exec", app.env_flag, "--command=true").returncode == EXIT_INVALID
    app.assert_no_secrets()


def test_exec_interactive_gets_a_terminal(demo_app):
    """A real pseudo-terminal around the CLI (script(1)), as an operator's console."""
    app = demo_app
    assert app.deploy().returncode == 0
    inv = shlex.join([str(Path(sys.executable).parent / "inv"), "exec", app.env_flag,
                      "--interactive", "--command=tty; test -t 0 && echo has-a-tty; exit 5"])
    result = subprocess.run(["script", "-qec", inv, "/dev/null"], cwd=app.path,
                            env=app.process_env(), capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "/dev/pts/" in result.stdout
    assert "has-a-tty" in result.stdout


def test_deploys_prune_old_images_and_the_audit_log_shows_them(demo_app):
    app = demo_app
    image = f"e2e-{app.hex}-server"  # its own name: nothing of other tests is touched
    app.write_config(app={"image": image}, deployment={"keep_images": 2}, commit=True)
    try:
        shas = []
        for n in range(4):
            shas.append(app.commit(f"v{n}")[:7])
            assert app.deploy().returncode == 0, app.runs[-1].stderr
        tags = subprocess.run(["docker", "image", "ls", "--format", "{{.Tag}}", image],
                              capture_output=True, text=True, check=True).stdout.split()
        assert sorted(tags) == sorted(shas[-2:])
        releases = sorted(p.name for p in (Path(app.remote_dir) / "releases").iterdir())
        assert releases == sorted(shas[-2:])

        audit = app.inv("audit", app.env_flag, "--lines=2")
        assert audit.returncode == 0
        lines = audit.stdout.strip().splitlines()
        assert len(lines) == 2
        assert all(" deploy  succeeded  " in line for line in lines)
        assert f"version={shas[-1]}" in lines[-1], "newest last"
        records = json.loads(app.inv("audit", app.env_flag, "--json").stdout)
        assert [r["version"] for r in records if r["operation"] == "deploy"] == shas
        assert app.inv("audit", app.env_flag, "--lines=0").returncode == EXIT_INVALID
    finally:
        ids = subprocess.run(["docker", "image", "ls", "-q", image], capture_output=True,
                             text=True, check=False).stdout.split()
        if ids:
            subprocess.run(["docker", "image", "rm", "-f", *set(ids)], capture_output=True,
                           check=False)


def test_lock_wait_queues_behind_a_held_lock(demo_app):
    app = demo_app
    assert app.inv("lock.acquire", app.env_flag, "--message=maintenance").returncode == 0

    start = time.monotonic()
    refused = app.deploy("--lock-wait=2")
    assert refused.returncode == EXIT_LOCK_HELD
    assert 2 <= time.monotonic() - start < 60
    assert "maintenance" in refused.stderr and "waiting up to 2 s" in refused.stderr
    assert app.state()["current_deployment"] is None

    releaser = threading.Timer(3, lambda: app.inv("lock.release", app.env_flag, check=True))
    releaser.start()
    try:
        queued = app.deploy("--lock-wait=30")
    finally:
        releaser.join()
    assert queued.returncode == 0, queued.stderr
    assert "waiting up to 30 s" in queued.stderr
    assert app.state()["current_deployment"]["status"] == "active"
    assert app.state()["lock"] == {"locked": False}


def test_version_names_this_package_invoke_and_fabric(demo_app):
    app = demo_app
    line = app.inv("version", check=True).stdout.strip()
    assert re.fullmatch(r"togather-tasks \S+ \(invoke \S+, fabric \S+, python \S+\)", line)
    versions = json.loads(app.inv("version", "--json", check=True).stdout)
    assert set(versions) == {"togather_tasks", "invoke", "fabric", "python"}
