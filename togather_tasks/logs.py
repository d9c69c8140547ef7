"""`inv logs`: the containers' logs from every host of an environment, bounded by default,
followed until Ctrl-C on request. Every line goes through the console (controls stripped,
secrets masked); with several hosts each line names its host."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import commands as cmd
from .errors import HostError, Interrupted, TogatherError, UsageError
from .hosts import Host
from .proxy import serving_slot
from .session import Session
from .signals import shielded

SLOT_CHOICES = ("active", "blue", "green", "proxy")
DEFAULT_LINES = 100
# A bounded read of one host; a followed log has no bound (it ends with Ctrl-C).
READ_TIMEOUT = 120
JOIN_POLL_SECONDS = 0.2
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class LogRequest:
    slot: str = "active"
    lines: int = DEFAULT_LINES
    since: str | None = None
    grep: str | None = None
    follow: bool = False
    hosts: str | None = None


def parse_duration(text: str) -> int:
    """`90s`, `10m`, `2h`, `1d`, `1h30m` -> seconds (Docker's own `--since` takes no days, and
    a timestamp there would be read in the host's time zone)."""
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise UsageError(f"--since takes a duration like 30s, 10m, 2h, 1d or 1h30m, "
                         f"not {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def check_request(request: LogRequest) -> None:
    if request.slot not in SLOT_CHOICES:
        raise UsageError(f"--slot must be one of {', '.join(SLOT_CHOICES)}, "
                         f"not {request.slot!r}")
    if request.lines < 1:
        raise UsageError("--lines must be at least 1")
    if request.since is not None:
        parse_duration(request.since)


def choose_hosts(configured: tuple[str, ...], wanted: str | None) -> list[str]:
    """The environment's hosts, or the comma-separated subset the operator named."""
    if not wanted:
        return list(configured)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in configured]
    if unknown or not names:
        raise UsageError(f"--hosts: {', '.join(unknown) or wanted!r} not in this environment "
                         f"({', '.join(configured)})")
    return names


def line_printer(host: str, several: bool, grep: str | None,
                 emit: Callable[[str, bool], None]) -> Callable[[str, bool], None]:
    """A LineSink that keeps the lines containing `grep` (plain text, case-sensitive) and
    prefixes each with its host when lines from several hosts interleave."""
    prefix = f"[{host}] " if several else ""

    def sink(line: str, from_stderr: bool) -> None:
        if grep is None or grep in line:
            emit(prefix + line, from_stderr)

    return sink


def service_for(session: Session, slot: str) -> str:
    """The compose service a --slot names."""
    if slot == "proxy":
        return "proxy"
    if slot != "active":
        return cmd.service(slot)
    return cmd.service(active_slot(session, hint="Name one with --slot=blue, green or proxy."))


def active_slot(session: Session, *, hint: str) -> str:
    """The slot the proxy serves (the state file can lag behind it after an interrupted run),
    else the state's."""
    active = serving_slot(session.settings, session.primary) \
        or session.store.read().state.active_slot
    if not active:
        raise TogatherError(f"{session.settings.env} has no active slot yet (nothing "
                            "deployed)", hint=hint)
    return active


def show_logs(session: Session, request: LogRequest) -> None:
    """Read (or follow) the logs on every chosen host at once. Ctrl-C while following is the
    normal way out: the streams are stopped and this returns (exit 0)."""
    names = choose_hosts(session.settings.hosts, request.hosts)
    service = service_for(session, request.slot)
    since = parse_duration(request.since) if request.since is not None else None
    command = cmd.logs_command(session.settings, service, lines=request.lines,
                               since_seconds=since, follow=request.follow)
    read_logs(session, [session.host(name) for name in names], command, request)


def read_logs(session: Session, hosts: list[Host], command: str, request: LogRequest) -> None:
    """Run the log `command` on every host in `hosts` at once, printing whole lines (prefixed
    by the host when there are several, filtered by --grep); Ctrl-C ends a --follow."""
    emit = _emitter(session)
    stop = threading.Event()
    readers = [_Reader(host, command, line_printer(host.name, len(hosts) > 1, request.grep,
                                                   emit), stop, request.follow)
               for host in hosts]
    try:
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join_interruptibly()
    except Interrupted:
        if not request.follow:
            raise
        with shielded():
            stop.set()
            for reader in readers:
                reader.thread.join(timeout=15)
        return
    _report_failures(readers)


def _emitter(session: Session) -> Callable[[str, bool], None]:
    """Prints whole lines from the reader threads one at a time, through the console."""
    console = session.console
    printing = threading.Lock()

    def emit(line: str, from_stderr: bool) -> None:
        with printing:
            (console.note if from_stderr else console.always)(line)

    return emit


class _Reader:
    """One host's log stream in a thread of its own (each host has its own connection)."""

    def __init__(self, host: Host, command: str, sink: Callable[[str, bool], None],
                 stop: threading.Event, follow: bool) -> None:
        self.host = host
        self.error: BaseException | None = None
        self.status = 0
        self.stderr = ""
        self.thread = threading.Thread(target=self._read, name=f"logs-{host.name}",
                                       args=(command, sink, stop, follow), daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join_interruptibly(self) -> None:
        # A bare join() would hold off the signal handler (and so Ctrl-C) until it returns.
        while self.thread.is_alive():
            self.thread.join(JOIN_POLL_SECONDS)

    def _read(self, command: str, sink: Callable[[str, bool], None], stop: threading.Event,
              follow: bool) -> None:
        try:
            result = self.host.stream(command, sink, stop=stop,
                                      timeout=None if follow else READ_TIMEOUT)
            self.status, self.stderr = result.exit_status, result.stderr
        except (TogatherError, OSError) as exc:
            self.error = exc


def _report_failures(readers: list[_Reader]) -> None:
    problems = [f"{r.host.name}: {r.error}" for r in readers if r.error is not None]
    problems += [f"{r.host.name}: docker compose logs exited {r.status}"
                 for r in readers if r.error is None and r.status != 0]
    if problems:
        raise HostError("could not read the logs: " + "; ".join(problems))
