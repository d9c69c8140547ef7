"""`inv init` and `inv hosts.setup` (issue 11) through the real command line.

init: in an empty repository (with the `togather` command, as there is no tasks.py yet), then
`inv` in it; in one that already has a config; the written config validating once hosts and
secrets are filled in.

hosts.setup: on a host that starts without Docker, a container of the test bed's base image
(debian:bookworm-slim) running only sshd with a root login key, on a free loopback port of the
root Docker: --dry-run changes nothing, a run installs everything, a second run changes
nothing; then as a user without sudo, and on an unreachable host. dockerd cannot start in an
unprivileged container (and `--privileged` is refused by this machine's Docker: "unable to
apply caps"), so the daemon item stays a warning here and `docker info` is not checked; the
packages, binaries, user, group and directory are.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_clean_failure, free_ports, run

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
FRESH_HOST_DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server \\
 && rm -rf /var/lib/apt/lists/* && mkdir -p /run/sshd
CMD ["/usr/sbin/sshd", "-D", "-e"]
"""
SETUP_TIMEOUT = 600


def cli(binary: str, cwd: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / binary), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=SETUP_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
                          env={**os.environ, **(env or {})})


def test_init_in_an_empty_repository_then_validate(tmp_path: Path) -> None:
    repo = tmp_path / "shop-api"
    repo.mkdir()
    result = cli("togather", repo, "init")
    assert result.returncode == 0, result.stderr
    assert "wrote config/deployment.yml" in result.stdout
    assert "wrote tasks.py" in result.stdout
    assert "name: shop-api" in (repo / "config" / "deployment.yml").read_text()

    # Before the hosts are filled in: exit 10, naming the key.
    staging = cli("inv", repo, "config.validate", "--env=staging")
    assert staging.returncode == 10
    assert "environments.staging.hosts" in staging.stderr
    assert "Traceback" not in staging.stdout + staging.stderr

    config = repo / "config" / "deployment.yml"
    config.write_text(config.read_text().replace("hosts: []", "hosts: [deploy@10.0.0.5]"))
    env_dir = repo / "config" / "environments"
    secrets = env_dir / ".env.staging"
    secrets.write_text((env_dir / ".env.staging.example").read_text()
                       .replace("CHANGE_ME", "a-long-random-value-0123"))
    secrets.chmod(0o600)
    valid = cli("inv", repo, "config.validate", "--env=staging")
    assert valid.returncode == 0, valid.stderr
    assert "staging: configuration is valid" in valid.stdout
    # Real secrets files are ignored by git, the examples are not.
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(secrets)], cwd=repo, check=False)
    example = subprocess.run(["git", "check-ignore", "-q", str(env_dir / ".env.staging.example")],
                             cwd=repo, check=False)
    assert (ignored.returncode, example.returncode) == (0, 1)


def test_init_where_a_config_exists_keeps_it_and_says_so(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    (repo / "config").mkdir(parents=True)
    (repo / "config" / "deployment.yml").write_text("app: {name: mine}\n")
    (repo / "tasks.py").write_text("from togather_tasks import namespace\n"
                                   "ns = namespace(__file__)\n")
    (repo / ".gitignore").write_text("*.log\n")
    result = cli("inv", repo, "init")
    assert result.returncode == 0, result.stderr
    assert "kept  config/deployment.yml (it exists; not overwritten)" in result.stdout
    assert "kept  tasks.py" in result.stdout
    assert "wrote config/environments/.env.staging.example" in result.stdout
    assert (repo / "config" / "deployment.yml").read_text() == "app: {name: mine}\n"
    assert (repo / ".gitignore").read_text().startswith("*.log\n")

    again = cli("inv", repo, "init", f"--path={repo}")
    assert again.returncode == 0
    assert "wrote" not in again.stdout and "added to .gitignore" not in again.stdout


def test_init_on_a_path_that_is_not_a_directory(tmp_path: Path) -> None:
    result = cli("togather", tmp_path, "init", f"--path={tmp_path / 'missing'}")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


# --- hosts.setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FreshHost:
    container: str
    ssh_config: Path

    def sh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", "exec", self.container, "sh", "-c", command], check=check)

    def changes(self) -> list[str]:
        """The container's files changed since its image (`docker diff`), without sshd's
        per-login records."""
        lines = run(["docker", "diff", self.container]).stdout.splitlines()
        return sorted(line for line in lines if not line.split()[-1].startswith(
            ("/var/log", "/run", "/tmp", "/root/.ssh")))


def fresh_host_image() -> str:
    """Built once per Dockerfile content (apt inside `docker build`), then reused."""
    tag = "togather-fresh-host:" + hashlib.sha256(FRESH_HOST_DOCKERFILE.encode()).hexdigest()[:12]
    if run(["docker", "image", "inspect", tag], check=False).returncode != 0:
        run(["docker", "build", "-q", "-t", tag, "-"], input=FRESH_HOST_DOCKERFILE, timeout=600)
    return tag


def wait_for_ssh(config: Path, alias: str) -> None:
    for _ in range(60):
        if run(["ssh", "-F", str(config), "-o", "BatchMode=yes", alias, "true"],
               check=False, timeout=30).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"sshd of {alias} did not answer within 30 s")


@pytest.fixture
def fresh_host(tmp_path: Path) -> Iterator[FreshHost]:
    """A container without Docker: sshd only, root logs in with a key made for this test,
    strict known_hosts from the container's own host key. Aliases `fresh-root` and
    `fresh-deploy` (the user hosts.setup creates) in a temporary ssh config."""
    key = tmp_path / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    port = free_ports(1)[0]
    container = f"togather-fresh-{secrets.token_hex(4)}"
    run(["docker", "run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:22",
         "-v", f"{key}.pub:/root/.ssh/authorized_keys:ro", fresh_host_image()])
    try:
        host_key = run(["docker", "exec", container, "cat",
                        "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()[:2]
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        config = tmp_path / "ssh_config"
        config.write_text("".join(
            f"Host fresh-{user}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
            f"  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n" for user in ("root", "deploy")))
        wait_for_ssh(config, "fresh-root")
        yield FreshHost(container, config)
    finally:
        run(["docker", "rm", "-f", container], check=False)


def app_repository(tmp_path: Path, host: str) -> Path:
    """`togather init`, then staging's host and secrets filled in (dbmate, a database)."""
    repo = tmp_path / "shop"
    repo.mkdir()
    assert cli("togather", repo, "init").returncode == 0
    set_host(repo, host)
    env_dir = repo / "config" / "environments"
    secrets_file = env_dir / ".env.staging"
    secrets_file.write_text((env_dir / ".env.staging.example").read_text()
                            .replace("CHANGE_ME", "a-long-random-value-0123"))
    secrets_file.chmod(0o600)
    return repo


def set_host(repo: Path, host: str) -> None:
    """Every environment but development (`local`) on `host`: the config validates only
    with hosts in each."""
    config = repo / "config" / "deployment.yml"
    config.write_text(re.sub(r"hosts: \[(?!local\])[^\]]*\]", f"hosts: [{host}]",
                             config.read_text()))


def item_lines(stdout: str, host: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"{host}: ")
            and line.split()[1] in ("ok", "changed", "missing")]


def test_hosts_setup_prepares_a_fresh_host_once(tmp_path: Path, fresh_host: FreshHost) -> None:
    repo = app_repository(tmp_path, "fresh-root")
    ssh_env = {"TOGATHER_SSH_CONFIG": str(fresh_host.ssh_config)}
    setup = ("hosts.setup", "--env=staging")
    before = fresh_host.changes()

    dry = cli("inv", repo, *setup, "--dry-run", env=ssh_env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run: nothing was changed" in dry.stdout
    assert "fresh-root: missing  packages (docker.io, ca-certificates, postgresql-client)" \
        in dry.stdout
    assert "apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends " \
           "docker.io ca-certificates postgresql-client" in dry.stdout
    assert "useradd --create-home" in dry.stdout and "upload /usr/local/bin/dbmate (" in dry.stdout
    assert fresh_host.changes() == before, "the dry run changed the host"
    assert fresh_host.sh("command -v docker", check=False).returncode != 0

    first = cli("inv", repo, *setup, env=ssh_env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stdout + first.stderr
    assert "fresh-root: changed  packages" in first.stdout
    assert "fresh-root: ready for deploys as deploy" in first.stdout
    # No systemd in a container: the daemon is the one item left to the operator, said once.
    assert "docker daemon (running): not in place" in first.stderr

    remote_dir = "/srv/shop/staging"
    facts = fresh_host.sh(f"id -nG deploy; stat -c %U:%a {remote_dir}; docker --version; "
                          "docker compose version --short; pg_dump --version; "
                          "dbmate --version").stdout.splitlines()
    assert "docker" in facts[0].split()
    assert facts[1] == "deploy:750"
    assert facts[2].startswith("Docker version ")
    assert facts[3].lstrip("v").startswith("2.")
    assert facts[4].startswith("pg_dump (PostgreSQL)") and facts[5].startswith("dbmate version")
    # The deploy user logs in with root's key and finds what a deploy needs.
    as_deploy = run(["ssh", "-F", str(fresh_host.ssh_config), "-o", "BatchMode=yes",
                     "fresh-deploy", f"id -nG && docker compose version --short && "
                     f"touch {remote_dir}/probe && rm {remote_dir}/probe"])
    assert "docker" in as_deploy.stdout.split()

    settled = fresh_host.changes()
    again = cli("inv", repo, *setup, env=ssh_env)
    assert again.returncode == 0, again.stdout + again.stderr
    lines = item_lines(again.stdout, "fresh-root")
    assert len(lines) == 7 and all(line.split()[1] == "ok" for line in lines), again.stdout
    assert "fresh-root: ready for deploys as deploy (nothing changed)" in again.stdout
    assert fresh_host.changes() == settled, "the second run changed the host"

    # As the deploy user (not root, and no sudo on this host): refused, naming the host.
    set_host(repo, "fresh-deploy")
    refused = cli("inv", repo, *setup, env=ssh_env)
    assert_clean_failure(refused, contains="fresh-deploy: connected as deploy", code=1)
    assert "sudo -n" in refused.stderr


def test_hosts_setup_on_an_unreachable_host(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    repo = app_repository(tmp_path, f"root@127.0.0.1:{port}")
    result = cli("inv", repo, "hosts.setup", "--env=staging", "--yes")
    line = assert_clean_failure(result, contains=f"cannot reach root@127.0.0.1:{port}", code=1)
    assert "connection refused" in line.lower() or "unable to connect" in line.lower(), line
