"""An in-memory Host for unit tests of the slot, proxy and operation logic (files live in a
dict, commands are answered by rules the test sets, HTTP answers by a function the test sets),
and a Session around one or several of them (a fleet) whose state store is real, in a
temporary directory on this machine."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shlex
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from togather_tasks import commands as cmd
from togather_tasks.config import Settings
from togather_tasks.hosts import Host, HttpResponse, LocalHost, Result
from togather_tasks.lock import Operator
from togather_tasks.output import Console, RunLog
from togather_tasks.redact import Redactor
from togather_tasks.store import StateStore

Rule = Callable[[str], Result | None]
BATCH = re.compile(r"--togather-batch-[0-9a-f]+-- begin")
BATCH_SECTION = re.compile(r"printf '%s\\n' '(--togather-batch-[0-9a-f]+--) begin (\w+)'; "
                           r"\( (.*?)\n\); printf", re.DOTALL)


def ok(stdout: str = "", command: str = "") -> Result:
    return Result(command, 0, stdout, "", 0.0)


def failed(stderr: str = "failed", status: int = 1, command: str = "") -> Result:
    return Result(command, status, "", stderr, 0.0)


class FakeHost(Host):
    """`journal`, when given, is shared by several hosts: what each did, in the order it
    happened across the fleet (`(host, command)`, a write as `write PATH`)."""

    def __init__(self, name: str = "fake",
                 journal: list[tuple[str, str]] | None = None) -> None:
        super().__init__(name)
        self.files: dict[str, bytes] = {}
        self.commands: list[str] = []
        self.journal = journal if journal is not None else []
        self.rules: list[tuple[str, Rule]] = []
        self.http: Callable[[str, int, str, float], HttpResponse] = self._refuse
        self.request_headers: list[dict[str, str]] = []
        self._busy = threading.Lock()

    def on(self, fragment: str, answer: Result | Rule) -> None:
        """Commands containing `fragment` get `answer` (the latest rule wins)."""
        rule = answer if callable(answer) else (lambda _command: answer)
        self.rules.insert(0, (fragment, rule))

    def ran(self, fragment: str) -> list[str]:
        return [c for c in self.commands if fragment in c]

    def _run(self, command: str, timeout: float | None) -> Result:
        # A host's connection is never shared between threads: a second one here is a bug.
        if not self._busy.acquire(blocking=False):
            raise AssertionError(f"{self.name} used by two threads at once")
        try:
            return self._answer(command)
        finally:
            self._busy.release()

    def _answer(self, command: str) -> Result:
        self.commands.append(command)
        self.journal.append((self.name, command))
        if BATCH.search(command) and not any(
                fragment in command and getattr(rule, "whole_batch", False)
                for fragment, rule in self.rules):
            return self._answer_batch(command)
        return self._answer_one(command)

    def _answer_batch(self, command: str) -> Result:
        """A batch of probes (togather_tasks.batch) as the shell runs it: each section
        answered on its own by the rules, framed by its marker lines."""
        out = []
        for marker, name, section in BATCH_SECTION.findall(command):
            result = self._answer_one(section)
            out.append(f"{marker} begin {name}\n{result.stdout}\n"
                       f"{marker} end {name} {result.exit_status}\n")
        return ok("".join(out), command)

    def _answer_one(self, command: str) -> Result:
        for fragment, rule in self.rules:
            if fragment in command and (result := rule(command)) is not None:
                return result
        if command.startswith("cat "):
            return ok(self.files.get(shlex.split(command)[1], b"").decode())
        return ok()

    def _write(self, path: str, data: bytes, mode: int) -> None:
        self.files[path] = data

    def _rename(self, src: str, dst: str) -> None:
        self.journal.append((self.name, f"write {dst}"))
        self.files[dst] = self.files.pop(src)

    def _stream_into(self, command: str, source: IO[bytes], timeout: float) -> Result:
        return self._run(command, timeout)

    def http_get(self, address: str, port: int, path: str, *, timeout: float,
                 headers: dict[str, str] | None = None) -> HttpResponse:
        self.request_headers.append(dict(headers or {}))
        return self.http(address, port, path, timeout)

    @staticmethod
    def _refuse(address: str, port: int, path: str, timeout: float) -> HttpResponse:
        raise ConnectionRefusedError(f"connection refused on {address}:{port}")


def batch_answer(**outputs: str) -> Rule:
    """Answers a batch of probes (togather_tasks.batch): each named section prints its text
    and exits 0."""
    def rule(command: str) -> Result:
        marker = re.search(r"(--togather-batch-[0-9a-f]+--) begin", command)
        assert marker, f"not a batch: {command[:80]}"
        return ok("".join(f"{marker[1]} begin {name}\n{text}\n{marker[1]} end {name} 0\n"
                          for name, text in outputs.items()))

    rule.whole_batch = True  # type: ignore[attr-defined]
    return rule


STOP = "docker stop --time"  # in every slot's stop (commands.stop_slot), in no other command


def stop_fragment(slot: str) -> str:
    """What only the command that stops `slot` contains (commands.stop_slot)."""
    return (f"service={cmd.service(slot)} --filter label=com.docker.compose.oneoff=False); "
            f'[ -z "$ids" ] || {STOP}')


def answer(status: int = 200, *, slot: str | None = None, body: bytes = b"{}") -> HttpResponse:
    headers = {"x-togather-slot": slot} if slot else {}
    return HttpResponse(status, headers, body)


class FakeSession:
    """What an operation uses of a Session: slots on FakeHosts (`web1` by default, or the
    names given: a fleet whose first host is the primary), the state on this machine."""

    def __init__(self, settings: Settings, state_dir: Path,
                 names: tuple[str, ...] = ("web1",)) -> None:
        settings = dataclasses.replace(settings, hosts=names)
        self.settings = settings
        self.console = Console(Redactor(settings.secret_values()), stream=io.StringIO(),
                               err=io.StringIO())
        self.redact = self.console.redactor
        self.log = RunLog(None, self.redact)
        self.journal: list[tuple[str, str]] = []
        self.hosts = {name: FakeHost(name, self.journal) for name in names}
        self.all_hosts = list(self.hosts.values())
        self.primary = self.all_hosts[0]
        self.store = StateStore(LocalHost(), str(state_dir), settings.env)
        self.operator = Operator(email="alice@example.com", hostname=socket.gethostname(),
                                 pid=os.getpid())

    def host(self, name: str) -> FakeHost:
        return self.hosts[name]

    def heartbeat_store(self) -> StateStore:
        return StateStore(LocalHost(), self.store.directory, self.settings.env)

    def audit(self, **fields: object) -> None:
        """Not under test here."""

    @property
    def output(self) -> str:
        return self.console.out.getvalue() + self.console.err.getvalue()


class ProxyDisk:
    """The proxy's files on a FakeHost, with the shell commands that touch them answered as
    the shell would (commands.read_routes, proxy_files, mark_slot, unmark_slots): the slot
    marker is a file in `host.files`, and nginx (the test's http function) serves what it
    says. `refuse_marks` makes the marker's directory read-only."""

    def __init__(self, host: FakeHost, settings: Settings) -> None:
        self.host = host
        host.disk = self  # type: ignore[attr-defined]
        self.layout = cmd.Layout(settings.remote_dir)
        self.refuse_marks = False
        self.marks_allowed: int | None = None  # then refused (see refuse_marks)
        host.on("for n in green blue; do", self._read_routes)
        # commands.proxy_files starts with the slots' networks (commands.slot_networks).
        host.on("docker ps --all --filter label=com.docker.compose.project=", self._proxy_files)
        self.slot_networks = ""  # `<service> <networks>` lines; none: no slot container yet
        host.on(f"mv -fT {self.layout.proxy_state_dir}", self._mark)
        host.on(f"rm -f {self.layout.slot_marker('blue')}", self._unmark)

    def load_site(self, settings: Settings, token: str = "ab" * 16) -> None:
        """The running nginx loaded the site `settings` want; the host has its token."""
        from togather_tasks import proxy

        text = proxy.site_conf(settings)
        self.host.files[self.layout.site_file] = text.encode()
        digest = proxy.site_digest(text + proxy.verify_map(token))
        self.host.files[self.layout.site_loaded] = f"{digest}\n".encode()
        self.host.files[self.layout.verify_map] = proxy.verify_map(token).encode()

    def mark(self, slot: str | None) -> None:
        for name in ("blue", "green"):
            self.host.files.pop(self.layout.slot_marker(name), None)
        if slot:
            self.host.files[self.layout.slot_marker(slot)] = b""

    @property
    def slot(self) -> str | None:
        names = [n for n in ("green", "blue") if self.layout.slot_marker(n) in self.host.files]
        return names[0] if names else None

    def _read_routes(self, command: str) -> Result:
        names = [n for n in ("green", "blue", "maintenance")
                 if self.layout.slot_marker(n) in self.host.files]
        legacy = self.host.files.get(self.layout.upstream_file, b"").decode()
        return ok("".join(f"{n}\n" for n in names) + "--\n" + legacy)

    def _proxy_files(self, command: str) -> Result:
        files = self.host.files
        loaded = files.get(self.layout.site_loaded, b"").decode().strip()
        return ok(f"{self.slot_networks}--\n{loaded}\n"
                  + files.get(self.layout.verify_map, b"").decode() + "--\n"
                  + files.get(self.layout.site_file, b"").decode())

    def _mark(self, command: str) -> Result:
        if self.marks_allowed is not None:
            self.refuse_marks = self.marks_allowed <= 0
            self.marks_allowed -= 1
        if self.refuse_marks:
            return failed("mv: cannot move: Permission denied")
        target = shlex.split(command)[4].rsplit("/", 1)[-1]
        self.mark(target)
        return ok()

    def _unmark(self, command: str) -> Result:
        self.mark(None)
        return ok()
