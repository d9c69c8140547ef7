"""The `registry` build strategy for real: build once here, push to the fleet test bed's
registry, pull by digest on two fleet hosts (togather-host1, togather-host2); reuse of a pushed
image; the registry out of the hosts' reach during the pull; `docker login` against a registry
with htpasswd auth that the test starts itself.

The fleet pieces (hosts, registry.togather.test:5000) come from scripts/testbed-fleet.sh; the
tests skip when the fleet is not up. Everything a test makes on the fleet hosts (containers,
networks, its remote directory, its images) is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

FLEET = ("togather-host1", "togather-host2")
REGISTRY = "registry.togather.test:5000"
# From the root namespace 127.0.0.1:5000 is the same registry (through HAProxy); on a fleet
# host it is the host's own loopback, where nothing listens: the registry "down" for the pull
# only, after a push that works.
REGISTRY_UNREACHABLE_FROM_HOSTS = "127.0.0.1:5000"
GATEWAY = "10.77.0.1"  # PostgreSQL as the fleet hosts and their containers see it
DIGEST_RE = re.compile(r"^[a-z0-9._/:-]+@sha256:[0-9a-f]{64}$")


def ssh(alias: str, command: str, *, check: bool = True, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", alias,
                             command], capture_output=True, text=True, timeout=timeout,
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"ssh {alias} {command}: exit {result.returncode}\n"
                             f"{result.stdout}{result.stderr}")
    return result


def fleet_down() -> str | None:
    if not Path("/sys/class/net/tbbr0").exists():
        return "no bridge tbbr0"
    for alias in FLEET:
        try:
            if ssh(alias, "docker info > /dev/null", check=False, timeout=20).returncode:
                return f"{alias}: docker does not answer"
        except subprocess.TimeoutExpired:
            return f"{alias}: no answer"
    return None


@pytest.fixture(scope="module")
def fleet() -> None:
    if problem := fleet_down():
        pytest.skip(f"the fleet test bed is not up (`make testbed-fleet`): {problem}")


def _on_gateway(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.netloc.rpartition('@')[0]}@{GATEWAY}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


def rewrite_env_file(app: Any, **values: str) -> None:
    """Set `values` in the app's env file (kept at mode 600) and in `app.secrets`."""
    app.secrets.update(values)
    text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in app.secrets.items())
    app.env_file.write_text(text)
    os.chmod(app.env_file, 0o600)


class FleetApp:
    """A DemoApp deployed to FLEET with the registry strategy; host-side views over ssh."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.repository = f"{REGISTRY}/{app.name}"
        rewrite_env_file(app, **{k: _on_gateway(app.secrets[k])
                                 for k in ("DATABASE_URL", "DEPLOY_DATABASE_URL")})
        self.configure(self.repository)

    def configure(self, registry: str, registry_build: str = "local") -> None:
        self.app.write_config(build={"strategy": "registry", "registry": registry,
                                     "registry_build": registry_build},
                              environments={"staging": {"hosts": list(FLEET)}})

    def state(self, validate: Callable[[Any], None]) -> dict[str, Any]:
        doc = json.loads(ssh(FLEET[0], f"cat {self.app.state_path}").stdout)
        validate(doc)
        return doc

    def slot_image_id(self, alias: str, slot: str) -> str:
        fmt = "{{.Image}}"
        ids = ssh(alias, "docker ps --no-trunc -q --filter label=com.docker.compose.project="
                         f"{self.app.project} --filter label=com.docker.compose.service=app-"
                         f"{slot} | xargs -r docker inspect --format '{fmt}'").stdout.split()
        assert len(ids) == 1, f"{alias}: app-{slot} containers running: {ids}"
        return ids[0]

    def image_id(self, alias: str, ref: str) -> str:
        return ssh(alias, f"docker image inspect --format '{{{{.Id}}}}' {ref}").stdout.strip()

    def version(self, alias: str) -> str:
        out = ssh(alias, f"curl -fsS --max-time 5 http://127.0.0.1:{self.app.ports['proxy']}"
                         "/version").stdout
        return json.loads(out)["version"]

    def teardown(self) -> None:
        label = f"label=com.docker.compose.project={self.app.project}"
        images = "; ".join(remove_images_command(f"{registry}/{self.app.name}/")
                           for registry in (REGISTRY, REGISTRY_UNREACHABLE_FROM_HOSTS))
        for alias in FLEET:
            ssh(alias, f"docker ps -aq --filter {label} | xargs -r docker rm -f > /dev/null; "
                       f"docker network ls -q --filter {label} | xargs -r docker network rm "
                       f"> /dev/null; {images}; rm -rf {Path(self.app.remote_dir).parent}",
                check=False)
        subprocess.run(["bash", "-c", images], capture_output=True, check=False)


def remove_images_command(prefix: str) -> str:
    """Remove every image known under a repository starting with `prefix` (by id: pulled by
    digest, they have no tag of that name, and the commit's local tag goes with them)."""
    return ("docker images --format '{{.Repository}} {{.ID}}' | "
            f"awk -v p={shlex.quote(prefix)} 'index($1, p) == 1 {{print $2}}' | sort -u | "
            "xargs -r docker rmi -f > /dev/null")


@pytest.fixture
def fleet_app(fleet: None, demo_app_factory: Callable[..., Any]) -> Iterator[FleetApp]:
    app = FleetApp(demo_app_factory("staging"))
    yield app
    app.teardown()


def command_events_by_host(app: Any, run_index: int) -> list[tuple[str, str]]:
    """(host, command) of every command the `run_index`-th deploy's run log recorded."""
    logs = sorted(app.log_dir.rglob("*.log"))
    return [(event["host"], event["command"]) for line in logs[run_index].read_text().splitlines()
            if (event := json.loads(line)).get("event") == "command"]


def command_events(app: Any, run_index: int) -> list[str]:
    """The commands the run log of the `run_index`-th deploy recorded (in start order)."""
    return [command for _, command in command_events_by_host(app, run_index)]


def test_two_hosts_run_the_pushed_digest_and_a_second_deploy_reuses_it(
        fleet_app: FleetApp, assert_state_valid: Callable[[Any], None]) -> None:
    app = fleet_app.app
    first = app.deploy(check=True)
    current = fleet_app.state(assert_state_valid)["current_deployment"]
    digest = current["image_digest"]
    assert DIGEST_RE.match(digest) and digest.startswith(fleet_app.repository + "/"), digest
    assert current["image"] == f"togather-server:{app.head[:7]}"
    for alias in FLEET:
        running = fleet_app.slot_image_id(alias, current["active_slot"])
        assert running == fleet_app.image_id(alias, digest), alias
        assert running == fleet_app.image_id(alias, current["image"]), alias
        assert fleet_app.version(alias) == app.head[:7]
    assert "docker push" in " ".join(command_events(app, 0))

    second = app.deploy(check=True)
    again = fleet_app.state(assert_state_valid)["current_deployment"]
    assert again["image_digest"] == digest
    assert re.search(r"build .*reused", second.stdout), second.stdout
    commands = " ".join(command_events(app, 1))
    assert "docker build" not in commands and "docker push" not in commands
    assert "docker pull" not in commands
    for alias in FLEET:
        assert fleet_app.slot_image_id(alias, again["active_slot"]) == \
            fleet_app.image_id(alias, digest)
    app.assert_no_secrets(first.stdout, second.stdout)


def test_first_host_builds_and_pushes_and_the_others_pull_its_digest(
        fleet_app: FleetApp, assert_state_valid: Callable[[Any], None]) -> None:
    app = fleet_app.app
    fleet_app.configure(fleet_app.repository, registry_build="first-host")
    app.deploy(check=True)
    current = fleet_app.state(assert_state_valid)["current_deployment"]
    by_host: dict[str, list[str]] = {}
    for command in command_events_by_host(app, 0):
        by_host.setdefault(command[0], []).append(command[1])
    assert any(c.startswith("docker build") for c in by_host[FLEET[0]])
    assert any("docker push" in c for c in by_host[FLEET[0]])
    assert any("docker pull" in c for c in by_host[FLEET[1]])
    assert not any("docker build --quiet --tag" in c for c in by_host.get("local", []))
    for alias in FLEET:
        assert fleet_app.slot_image_id(alias, current["active_slot"]) == \
            fleet_app.image_id(alias, current["image_digest"]), alias


def test_the_registry_out_of_reach_during_the_pull_fails_cleanly_on_the_old_version(
        fleet_app: FleetApp, assert_state_valid: Callable[[Any], None],
        cli_failure: Callable[..., str]) -> None:
    app = fleet_app.app
    app.deploy(check=True)
    old = fleet_app.state(assert_state_valid)["current_deployment"]
    app.commit("a new version")
    fleet_app.configure(f"{REGISTRY_UNREACHABLE_FROM_HOSTS}/{app.name}")

    result = app.deploy()

    line = cli_failure(result, contains="could not pull", code=1)
    # The hosts pull in parallel: the first to fail is named, whichever it is.
    assert any(alias in line for alias in FLEET), line
    assert f"registry {REGISTRY_UNREACHABLE_FROM_HOSTS}" in line, line
    state = fleet_app.state(assert_state_valid)
    assert state["current_deployment"]["id"] == old["id"]
    assert not state["lock"]["locked"]
    for alias in FLEET:
        assert fleet_app.version(alias) == old["version"], alias


# --- a registry that needs a login ----------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def bcrypt_hash(password: str) -> str:
    """The only format the registry's htpasswd accepts, made by the system's crypt(3)
    (libxcrypt): no apache2-utils or bcrypt package needed. `crypt` leaves Python in 3.13."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    salt = crypt.mksalt(crypt.METHOD_BLOWFISH)  # noqa: S324 - bcrypt, not a weak hash
    return crypt.crypt(password, salt)


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """Debian's docker-registry with htpasswd auth on a free loopback port (the root daemon
    trusts plain HTTP there): (address, user, password); stopped by its pid afterwards."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed")
    user, password = f"e2e-{secrets.token_hex(4)}", secrets.token_urlsafe(18)
    (tmp_path / "htpasswd").write_text(f"{user}:{bcrypt_hash(password)}\n")
    port = free_loopback_port()
    config = tmp_path / "registry.yml"
    config.write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "auth": {"htpasswd": {"realm": "e2e", "path": str(tmp_path / "htpasswd")}}}))
    with (tmp_path / "registry.log").open("wb") as log:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("the auth registry did not start: "
                            + (tmp_path / "registry.log").read_text()[-500:], pytrace=False)
            time.sleep(0.1)
        yield f"127.0.0.1:{port}", user, password
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_a_registry_with_a_login_gets_the_credentials_on_stdin_only(
        demo_app: Any, auth_registry: tuple[str, str, str],
        assert_state_valid: Callable[[Any], None], cli_failure: Callable[..., str]) -> None:
    address, user, password = auth_registry
    repository = f"{address}/{demo_app.name}"
    demo_app.write_config(build={"strategy": "registry", "registry": repository})
    try:
        rewrite_env_file(demo_app, DEPLOY_REGISTRY_USERNAME=user,
                         DEPLOY_REGISTRY_PASSWORD=password + "-wrong")
        cli_failure(demo_app.deploy(), contains=f"docker login to the registry {address} "
                                                 "failed on local", code=1)

        rewrite_env_file(demo_app, DEPLOY_REGISTRY_PASSWORD=password)
        demo_app.deploy(check=True)
        digest = demo_app.state()["current_deployment"]["image_digest"]
        assert digest.startswith(repository + "/")
        # The host (this machine's daemon over ssh) now has to pull: its login is exercised.
        subprocess.run(["docker", "rmi", digest, digest.split("@")[0] + ":" +
                        demo_app.head[:7]], capture_output=True, check=True)
        second = demo_app.deploy(check=True)
        commands = " ".join(command_events(demo_app, 2))
        assert "docker login" in commands and "docker pull" in commands, commands
        assert "docker push" not in commands, "the pushed tag should have been reused"
        assert demo_app.state()["current_deployment"]["image_digest"] == digest
        assert not list(Path(demo_app.remote_dir).glob(".docker-config.*")), \
            "the per-operation docker config is removed"
        assert user not in " ".join(command_events(demo_app, 1) + [second.stdout])
        demo_app.assert_no_secrets()
    finally:
        demo_app.compose("down", "--timeout", "2")  # its containers use the image removed next
        subprocess.run(["bash", "-c", remove_images_command(repository + "/")],
                       capture_output=True, check=False)
