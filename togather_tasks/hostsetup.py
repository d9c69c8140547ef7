"""`hosts.setup`: prepare an environment's hosts (what each needs: provision.py).

Runbook: read each host's facts (user, root or sudo, architecture, init system, OS); probe
every item on every host; refuse what this tool cannot do before anything changes; with
--dry-run print the plan and stop; otherwise, host by host, probe each item again, put it in
place only when missing, and probe it once more to be sure. A second run changes nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandError, HostError
from .hosts import LOCAL, Host
from .output import Console
from .provision import (
    APT_INSTALL_SECONDS,
    APT_UPDATE_SECONDS,
    FACTS_COMMAND,
    PIP_SECONDS,
    Binaries,
    Facts,
    Item,
    as_root,
    elf_arch,
    facts_problem,
    parse_facts,
    plan,
)
from .session import Session

# Where the docker CLI looks for the Compose plugin: the operator's own first.
COMPOSE_PLUGIN_PATHS = ("~/.docker/cli-plugins/docker-compose",
                        "/usr/local/lib/docker/cli-plugins/docker-compose",
                        "/usr/local/libexec/docker/cli-plugins/docker-compose",
                        "/usr/lib/docker/cli-plugins/docker-compose",
                        "/usr/libexec/docker/cli-plugins/docker-compose")
PROBE_TIMEOUT = 60
# The longest action: apt-get update and install, or a venv and a pip install, each bounded.
ACTION_TIMEOUT = APT_UPDATE_SECONDS * 2 + APT_INSTALL_SECONDS + PIP_SECONDS
UPLOAD_TIMEOUT = 900
ELF_HEADER_BYTES = 4096


@dataclass(frozen=True)
class HostPlan:
    host: Host
    facts: Facts
    items: list[Item]
    missing: list[Item]  # at the first probe


def local_binary(candidates: list[str], machine: str) -> Path | None:
    """The first candidate that is a static binary for a `machine` host."""
    for candidate in candidates:
        try:
            path = Path(candidate).expanduser().resolve(strict=True)
            with path.open("rb") as fh:
                header = fh.read(ELF_HEADER_BYTES)
        except OSError:
            continue
        if elf_arch(header) == machine:
            return path
    return None


def local_binaries(machine: str) -> Binaries:
    dbmate = shutil.which("dbmate")
    return Binaries(compose=local_binary(list(COMPOSE_PLUGIN_PATHS), machine),
                    dbmate=local_binary([dbmate] if dbmate else [], machine))


def read_facts(host: Host) -> Facts:
    facts = parse_facts(host.run(FACTS_COMMAND, timeout=PROBE_TIMEOUT, check=False).stdout)
    if facts is None:
        raise HostError(f"{host.name}: could not read its user, architecture and OS "
                        "(hosts.setup needs a Linux host with /etc/os-release)")
    problem = facts_problem(host.name, facts)
    if problem:
        raise HostError(problem)
    return facts


def present(host: Host, facts: Facts, item: Item) -> bool:
    return host.run(as_root(item.probe, facts), timeout=PROBE_TIMEOUT, check=False).ok


def plan_host(session: Session, name: str) -> HostPlan:
    host = session.host(name)
    facts = read_facts(host)
    st = session.settings
    items = plan(facts, remote_dir=st.remote_dir, primary=name == st.primary_host,
                 has_database=st.has_database, migration_tool=st.database["migration_tool"],
                 binaries=local_binaries(facts.machine))
    return HostPlan(host, facts, items, [i for i in items if not present(host, facts, i)])


def refuse_impossible(plans: list[HostPlan]) -> None:
    """A required item this tool cannot install fails the run before anything changes."""
    for p in plans:
        for item in p.missing:
            if item.action is None and item.required:
                raise HostError(f"{p.host.name}: {item.name} is missing; nothing was changed",
                                hint=item.why)


def show_plan(console: Console, plans: list[HostPlan]) -> None:
    console.print("dry run: nothing was changed. hosts.setup would:")
    for p in plans:
        for item in p.items:
            if item not in p.missing:
                console.print(f"{p.host.name}: ok       {item.name}")
                continue
            console.print(f"{p.host.name}: missing  {item.name}"
                          + (f" ({item.via})" if item.via else ""))
            if item.action is None:
                console.print(f"    cannot install it: {item.why}")
                continue
            if item.upload is not None:
                size = item.upload.stat().st_size // (1 << 20)
                console.print(f"    upload {item.upload} ({size} MiB) as standard input of:")
            console.print(f"    $ {as_root(item.action, p.facts)}")


def put_in_place(p: HostPlan, item: Item, action: str) -> None:
    command = as_root(action, p.facts)
    what = f"installing {item.name}"
    if item.upload is None:
        p.host.run(command, timeout=ACTION_TIMEOUT, what=what)
        return
    with item.upload.open("rb") as source:
        result = p.host.stream_into(command, source, timeout=UPLOAD_TIMEOUT)
    if not result.ok:
        raise CommandError(f"{what} failed on {p.host.name} (exit {result.exit_status})",
                           exit_status=result.exit_status, stderr=result.stderr)


def apply(console: Console, p: HostPlan) -> int:
    """Each item probed again just before (an earlier one may have brought it, as docker.io
    brings the docker group); returns how many items changed."""
    changed = 0
    for item in p.items:
        if present(p.host, p.facts, item):
            console.print(f"{p.host.name}: ok       {item.name}")
            continue
        if item.action is None:
            console.warn(f"{p.host.name}: {item.name}: not in place: {item.why}")
            continue
        put_in_place(p, item, item.action)
        if not present(p.host, p.facts, item):
            raise HostError(f"{p.host.name}: {item.name} is still missing after installing it",
                            hint=f"its check was: {item.probe}")
        console.print(f"{p.host.name}: changed  {item.name}"
                      + (f" ({item.via})" if item.via else ""))
        changed += 1
    return changed


def setup_hosts(session: Session, *, dry_run: bool) -> None:
    console = session.console
    names = [name for name in session.settings.hosts if name != LOCAL]
    if len(names) < len(session.settings.hosts):
        console.note("local: skipped (this machine, not a host to prepare over SSH)")
    plans = [plan_host(session, name) for name in names]
    refuse_impossible(plans)
    if dry_run:
        show_plan(console, plans)
        return
    for p in plans:
        changed = apply(console, p)
        console.print(f"{p.host.name}: ready for deploys as {p.facts.deploy_user} "
                      f"({changed or 'nothing'} changed)")
        if p.facts.uid == 0:
            console.print(f"{p.host.name}: connected as root; for deploys, name the host as "
                          f"{p.facts.deploy_user}@... in config/deployment.yml (same key)")
