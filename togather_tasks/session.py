"""One run of one command against one environment: its settings, its host connections (one
per host, opened on first use), its console, its run log and its state store."""

from __future__ import annotations

import json
from functools import cached_property

from .config import Settings
from .errors import UsageError
from .hosts import Host, LocalHost, Result, connect
from .lock import Operator
from .output import Console, RunLog
from .store import StateStore, audit_line_command, now_iso

COMMAND_LOG_TAIL = 2000


class Session:
    def __init__(self, settings: Settings, console: Console, log: RunLog, *,
                 accept_new_host_key: bool = False) -> None:
        self.settings = settings
        self.console = console
        self.log = log
        self.redact = console.redactor
        self._accept_new = accept_new_host_key
        self._hosts: dict[str, Host] = {}
        self._extra: list[Host] = []

    def host(self, name: str) -> Host:
        if name not in self._hosts:
            self._hosts[name] = connect(name, self._observe, redact=self.redact,
                                        accept_new_host_key=self._accept_new)
        return self._hosts[name]

    @property
    def primary(self) -> Host:
        return self.host(self.settings.primary_host)

    @property
    def all_hosts(self) -> list[Host]:
        return [self.host(name) for name in self.settings.hosts]

    def chosen_hosts(self, names: str | None) -> list[Host]:
        """The hosts a read-only command looks at: `--hosts=NAME[,NAME]`, else all of them.
        Checked before any connection: a typo is a usage error, not a connection timeout."""
        if not names:
            return self.all_hosts
        wanted = [name.strip() for name in names.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in self.settings.hosts]
        if unknown or not wanted:
            raise UsageError(f"--hosts: {', '.join(unknown) or 'no host named'} not in the "
                             f"{self.settings.env} environment",
                             hint=f"Its hosts: {', '.join(self.settings.hosts)}")
        return [self.host(name) for name in wanted]

    @cached_property
    def local(self) -> Host:
        """This machine (the operator's), for work done here, e.g. building and pushing an
        image; its commands are logged like the hosts'."""
        return LocalHost(self._observe, self.redact)

    @cached_property
    def store(self) -> StateStore:
        return StateStore(self.primary, self.settings.remote_dir, self.settings.env)

    @cached_property
    def operator(self) -> Operator:
        return Operator.current(str(self.settings.root))

    def heartbeat_store(self) -> StateStore:
        """A state store over a connection of its own to the primary host, for the lock's
        heartbeat thread (a connection is never shared between threads). Not observed: the
        run log belongs to the main thread."""
        host = connect(self.settings.primary_host, accept_new_host_key=self._accept_new,
                       redact=self.redact)
        self._extra.append(host)
        return StateStore(host, self.settings.remote_dir, self.settings.env)

    def ssh_connections(self) -> int:
        return sum(h.connections_opened for h in self._hosts.values())

    def _observe(self, host: Host, result: Result) -> None:
        fields = {"host": host.name, "command": result.command, "exit": result.exit_status,
                  "seconds": round(result.duration, 3)}
        # Redact before the tail is cut: a secret cut in half no longer matches its value.
        stderr = self.redact(result.stderr.strip())
        if not result.ok:
            fields["stderr"] = stderr[-COMMAND_LOG_TAIL:]
        self.log.event("command", **fields)
        self.console.debug(f"[{host.name}] $ {result.command}  -> exit {result.exit_status} "
                           f"in {result.duration:.2f}s")
        if stderr and self.console.debug_enabled:
            self.console.debug(stderr[-COMMAND_LOG_TAIL:])

    def audit(self, **fields: object) -> None:
        """Append one line to the host's audit log; never fails the operation."""
        record = {"ts": now_iso(), "environment": self.settings.env,
                  "by": self.operator.email, **fields}
        # Redact before JSON escaping: an escaped `"` or `\\` in a secret would not match.
        line = json.dumps(self.redact.redact_obj(record), sort_keys=True)
        try:
            self.primary.run(audit_line_command(self.settings.remote_dir, line), timeout=30,
                             check=False)
        except Exception as exc:  # noqa: BLE001 - the audit line is best effort by design
            self.console.warn(f"could not append the audit line on the host: {exc}")

    def round_trips(self) -> dict[str, dict[str, int]]:
        """Per host: connections opened, commands run and files written in this run (the
        heartbeat's own connection included under its host's name)."""
        counts: dict[str, dict[str, int]] = {}
        local = [self.__dict__["local"]] if "local" in self.__dict__ else []
        for host in [*self._hosts.values(), *self._extra, *local]:
            count = counts.setdefault(host.name, {"connections": 0, "commands": 0, "files": 0})
            count["connections"] += host.connections_opened
            count["commands"] += host.commands_run
            count["files"] += host.files_written
        return counts

    def close(self) -> None:
        for host in [*self._hosts.values(), *self._extra]:
            host.close()
        self.log.event("round_trips", hosts=self.round_trips())
        self.log.close()
