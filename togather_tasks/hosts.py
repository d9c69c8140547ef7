"""The one module that talks to hosts: Fabric/paramiko for SSH, Invoke's local runner for the
special host `local`, both behind the same small interface.

Hardening over plain Fabric:
- `~/.ssh/config` is always honoured (Fabric skips it when handed Invoke's config object, so we
  build our own `fabric.Config`);
- host keys are checked against known_hosts on every hop, ProxyJump gateways included (Fabric
  installs paramiko's AutoAddPolicy, which trusts any key); an unknown or changed key is refused
  unless the operator accepts a new host explicitly;
- connect and command timeouts, keepalives, one connection per host per run;
- every failure becomes a typed error with a one-line message.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import posixpath
import secrets
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fabric
import fabric.runners
import invoke
import paramiko
from invoke.exceptions import CommandTimedOut, ThreadException
from paramiko import sftp as sftp_proto

from .errors import (
    CommandError,
    CommandTimeoutError,
    HostAuthError,
    HostError,
    HostKeyError,
    HostUnreachableError,
)

# paramiko logs channel failures (e.g. a refused direct-tcpip probe of a slot that is not up
# yet) at ERROR; without a handler Python prints them on stderr. Our typed errors say it better.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

LOCAL = "local"
CONNECT_TIMEOUT = 15
KEEPALIVE_SECONDS = 15
DEFAULT_COMMAND_TIMEOUT = 600
IDLE_PROBE_SECONDS = 5
IDLE_PROBE_TIMEOUT = 10
# A health or version answer is a small JSON document; anything bigger is not one of ours.
HTTP_MAX_BYTES = 1 << 20


@dataclass
class Result:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    certificate: bytes | None = None  # over HTTPS: the server's certificate (DER)

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


CommandObserver = Callable[["Host", Result], None]
Redact = Callable[[str], str]
# Receives each line of a streamed command's output as it comes: (line, from_stderr).
LineSink = Callable[[str, bool], None]
STREAM_POLL_SECONDS = 0.05
STDERR_TAIL_LINES = 20


class _Lines:
    """Cuts a command's output into lines for a LineSink as bytes arrive (a line split across
    two reads is handed over whole) and keeps the last stderr lines for error messages."""

    def __init__(self, sink: LineSink) -> None:
        self.sink = sink
        self.pending = {False: b"", True: b""}
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def feed(self, data: bytes, from_stderr: bool) -> None:
        *complete, self.pending[from_stderr] = (self.pending[from_stderr] + data).split(b"\n")
        for raw in complete:
            self._hand_over(raw, from_stderr)

    def flush(self) -> None:
        for from_stderr, raw in self.pending.items():
            if raw:
                self._hand_over(raw, from_stderr)
        self.pending = {False: b"", True: b""}

    def _hand_over(self, raw: bytes, from_stderr: bool) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if from_stderr:
            self.stderr_tail.append(line)
        self.sink(line, from_stderr)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_tail)


def _unredacted(text: str) -> str:
    return text


@dataclass
class Host:
    """Common interface; `LocalHost` and `RemoteHost` implement the I/O hooks."""

    name: str
    observer: CommandObserver | None = field(default=None, repr=False)
    # Applied to command output before it is cut for an error message: a secret cut in half
    # by the cut would no longer match its value.
    redact: Redact = field(default=_unredacted, repr=False)
    # Round trips of this run, for the benchmarks: each command is a new session on the host
    # (milliseconds over SSH, before what it runs), each file write a few SFTP requests.
    commands_run: int = field(default=0, init=False, repr=False)
    files_written: int = field(default=0, init=False, repr=False)

    def run(self, command: str, *, timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
            check: bool = True, what: str | None = None) -> Result:
        """Run a shell command (already quoted by the caller). `check` turns a non-zero exit
        into CommandError; `what` names the action in that error."""
        start = time.monotonic()
        result = self._run(command, timeout)
        result.duration = time.monotonic() - start
        self._observe(result)
        if check and not result.ok:
            detail = (_last_line(self.redact(result.stderr))
                      or _last_line(self.redact(result.stdout)))
            raise CommandError(
                f"{what or 'command'} failed on {self.name} (exit {result.exit_status})"
                + (f": {detail}" if detail else ""),
                exit_status=result.exit_status, stderr=result.stderr)
        return result

    def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write a whole file atomically: temporary file in the same directory with its final
        mode, then rename; readers see the old or the new content, never a mix."""
        tmp = posixpath.join(posixpath.dirname(path),
                             f".{posixpath.basename(path)}.{secrets.token_hex(4)}.tmp")
        self._write(tmp, data, mode)
        self._rename(tmp, path)
        self.files_written += 1

    def write_temp(self, directory: str, data: bytes, *, mode: int = 0o600) -> str:
        """Write a new uniquely named file in `directory` (for a caller that renames it)."""
        tmp = posixpath.join(directory, f".upload.{secrets.token_hex(8)}.tmp")
        self._write(tmp, data, mode)
        self.files_written += 1
        return tmp

    def stream_into(self, command: str, source: IO[bytes], *, timeout: float) -> Result:
        """Run `command` with `source` as its standard input (e.g. `docker load`)."""
        start = time.monotonic()
        result = self._stream_into(command, source, timeout)
        result.duration = time.monotonic() - start
        self._observe(result)
        return result

    def stream(self, command: str, sink: LineSink, *, stop: threading.Event,
               timeout: float | None = None) -> Result:
        """Run `command`, handing each output line to `sink` as it comes, until the command
        ends or `stop` is set (then its standard input is closed and the command left to end:
        see commands.until_input_closes). The Result's stdout is empty (it was streamed), its
        stderr the last lines of stderr. `timeout` None: as long as it takes (a followed log)."""
        start = time.monotonic()
        lines = _Lines(sink)
        status = self._stream(command, lines, stop, timeout)
        lines.flush()
        result = Result(command, status, "", lines.stderr, time.monotonic() - start)
        self._observe(result)
        return result

    def interact(self, command: str) -> int:
        """Run `command` on a terminal attached to this process's own (an operator's console):
        keystrokes go to it, its output straight to the screen. Returns its exit status."""
        start = time.monotonic()
        status = self._interact(command)
        self._observe(Result(command, status, "", "", time.monotonic() - start))
        return status

    def http_get(self, address: str, port: int, path: str, *, timeout: float,
                 headers: dict[str, str] | None = None) -> HttpResponse:
        """GET http://address:port/path as seen from the host itself (a slot or the proxy on
        the host's loopback), without exposing anything: over SSH it is a direct-tcpip
        channel of the existing connection (so a header's value is on no command line)."""
        deadline = _Deadline(timeout)
        with contextlib.closing(self._tcp(address, port, timeout)) as conn:
            return _http_exchange(conn, address, port, path, deadline, headers)

    def https_get(self, address: str, port: int, path: str, *, timeout: float,
                  server_name: str, context: ssl.SSLContext,
                  headers: dict[str, str] | None = None) -> HttpResponse:
        """GET https://server_name/path from address:port as seen from the host (the proxy's
        HTTPS port), like http_get: TLS runs here, over the same plain connection, with SNI
        `server_name`. `context` decides what is verified (tls.probe_context: nothing, for
        the internal checks; the trust store, for the expiry report). The response carries
        the server's certificate."""
        deadline = _Deadline(timeout)
        with contextlib.closing(self._tcp(address, port, timeout)) as conn:
            tls = _TlsOver(conn, context, server_name, deadline)
            resp = _http_exchange(tls, server_name, port, path, deadline, headers)
            resp.certificate = tls.certificate
            return resp

    def _observe(self, result: Result) -> None:
        self.commands_run += 1
        if self.observer:
            self.observer(self, result)

    # I/O hooks
    def _tcp(self, address: str, port: int, timeout: float) -> Any:
        """A TCP connection to address:port from the host: a socket, or something with
        sendall/recv/settimeout/close (an SSH channel)."""
        raise NotImplementedError

    def _run(self, command: str, timeout: float | None) -> Result:
        raise NotImplementedError

    def _write(self, path: str, data: bytes, mode: int) -> None:
        raise NotImplementedError

    def _rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def _stream_into(self, command: str, source: IO[bytes], timeout: float) -> Result:
        raise NotImplementedError

    def _stream(self, command: str, lines: _Lines, stop: threading.Event,
                timeout: float | None) -> int:
        raise NotImplementedError

    def _interact(self, command: str) -> int:
        raise NotImplementedError

    @property
    def connections_opened(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing to close by default."""


class LocalHost(Host):
    """This machine, through Invoke's local runner: the same code path without SSH."""

    def __init__(self, observer: CommandObserver | None = None,
                 redact: Redact = _unredacted) -> None:
        super().__init__(name=LOCAL, observer=observer, redact=redact)
        self._context = invoke.Context()

    def _run(self, command: str, timeout: float | None) -> Result:
        try:
            r = self._context.run(command, hide=True, warn=True, in_stream=False, pty=False,
                                  timeout=timeout)
        except CommandTimedOut as exc:
            raise CommandTimeoutError(
                f"command timed out after {exc.timeout:g} s on {self.name}") from None
        return Result(command, r.exited, r.stdout, r.stderr, 0.0)

    def _write(self, path: str, data: bytes, mode: int) -> None:
        # Created with `mode` (masked by the umask, so never wider), then set exactly through
        # the descriptor before any byte is written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def _rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _stream_into(self, command: str, source: IO[bytes], timeout: float) -> Result:
        # subprocess rather than Invoke's runner: the child must see end-of-file on stdin.
        try:
            proc = subprocess.run(["/bin/bash", "-c", command], input=source.read(),
                                  capture_output=True, timeout=timeout, check=False,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise CommandTimeoutError(
                f"command timed out after {timeout:g} s on {self.name}") from None
        return Result(command, proc.returncode, proc.stdout.decode(errors="replace"),
                      proc.stderr.decode(errors="replace"), 0.0)

    def _stream(self, command: str, lines: _Lines, stop: threading.Event,
                timeout: float | None) -> int:
        deadline = _Deadline(timeout) if timeout else None
        # A session of its own: the operator's Ctrl-C reaches this process only, which then
        # ends the command through `stop`.
        proc = subprocess.Popen(["/bin/bash", "-c", command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ, False)
                selector.register(proc.stderr, selectors.EVENT_READ, True)
                while selector.get_map() and not stop.is_set():
                    if deadline is not None:
                        deadline.remaining()
                    for key, _ in selector.select(STREAM_POLL_SECONDS * 4):
                        data = os.read(key.fd, 1 << 16)
                        if data:
                            lines.feed(data, key.data)
                        else:
                            selector.unregister(key.fileobj)
        except TimeoutError:
            _end_process_group(proc)
            raise CommandTimeoutError(
                f"command timed out after {timeout:g} s on {self.name}") from None
        if stop.is_set():
            _end_process_group(proc)
        proc.stdin.close()
        return proc.wait()

    def _interact(self, command: str) -> int:
        r = self._context.run(command, pty=True, warn=True, hide=False, in_stream=sys.stdin)
        return r.exited

    def _tcp(self, address: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((address, port), timeout=timeout)


@dataclass
class KnownHosts:
    """What the known_hosts files say: the trusted entries, the revoked keys (`@revoked`), and
    whether any `@cert-authority` line was seen (host certificates are not supported: paramiko
    cannot verify them, so such lines trust nothing here)."""

    entries: list[paramiko.hostkeys.HostKeyEntry] = field(default_factory=list)
    revoked: set[tuple[str, str]] = field(default_factory=set)
    has_cert_authority: bool = False

    def is_revoked(self, key: paramiko.PKey) -> bool:
        return (key.get_name(), key.get_base64()) in self.revoked


def read_known_hosts(paths: list[str]) -> KnownHosts:
    """Parse known_hosts files ourselves: paramiko's loader fails on marker lines and does not
    enforce `@revoked`."""
    known = KnownHosts()
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise HostKeyError(f"cannot read known_hosts file {path}: {exc}") from None
        for number, line in enumerate(lines, 1):
            _read_known_hosts_line(known, line.strip(), f"{path}:{number}")
    # A revoked key is never trusted, even where another line lists it as valid.
    known.entries = [e for e in known.entries if not known.is_revoked(e.key)]
    return known


def _read_known_hosts_line(known: KnownHosts, line: str, where: str) -> None:
    if not line or line.startswith("#"):
        return
    marker = None
    if line.startswith("@"):
        marker, _, line = line.partition(" ")
        if marker == "@cert-authority":
            known.has_cert_authority = True
            return
        if marker != "@revoked":
            raise HostKeyError(f"{where}: unknown known_hosts marker {marker!r}")
    try:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line.strip())
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        raise HostKeyError(f"{where}: invalid known_hosts line ({_one_line(exc)})",
                           hint="Fix or remove that line (ssh-keygen -R HOST).") from None
    if entry is None:  # a key type paramiko does not know: it cannot match anyway
        return
    if marker == "@revoked":
        known.revoked.add((entry.key.get_name(), entry.key.get_base64()))
    else:
        known.entries.append(entry)


def revoked_key_error(hostname: str, key: paramiko.PKey) -> HostKeyError:
    return HostKeyError(
        f"host key of {hostname} ({key.get_name()} {fingerprint(key)}) is REVOKED in "
        "known_hosts: refused",
        hint="A revoked key is never trusted again: ask the host's owner for its new key.")


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...` as ssh-keygen -lf and ssh print it."""
    return key.fingerprint


class _StrictHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys, or with `accept_new` record them (ssh's accept-new); revoked
    keys are refused either way."""

    def __init__(self, known_hosts_file: str | None, accept_new: bool,
                 known: KnownHosts) -> None:
        self.known_hosts_file = known_hosts_file
        self.accept_new = accept_new
        self.known = known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if self.known.is_revoked(key):
            raise revoked_key_error(hostname, key)
        unknown = UnknownHostKeyError(self.known_hosts_file, client, hostname, key,
                                      self.known.has_cert_authority)
        if not self.accept_new:
            raise unknown
        unknown.record()


class UnknownHostKeyError(HostKeyError):
    """A host key found in no known_hosts file; `record()` trusts it (hosts.trust)."""

    def __init__(self, known_hosts_file: str | None, client: paramiko.SSHClient,
                 hostname: str, key: paramiko.PKey, cert_authority_seen: bool) -> None:
        certificates = (" Host certificates (@cert-authority lines) are not supported: "
                        "record the host's own key." if cert_authority_seen else "")
        super().__init__(
            f"unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}): refused",
            hint="Verify the fingerprint with the host's owner, then accept it once with "
                 "`inv hosts.trust --env=ENV`." + certificates)
        self.known_hosts_file = known_hosts_file
        self.client = client
        self.hostname = hostname
        self.key = key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def record(self) -> None:
        if not self.known_hosts_file:
            raise HostKeyError("no known_hosts file to record the new host key in")
        path = Path(self.known_hosts_file).expanduser()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(f"{self.hostname} {self.key.get_name()} {self.key.get_base64()}\n")
        self.client.get_host_keys().add(self.hostname, self.key.get_name(), self.key)


def known_hosts_files(ssh_config: dict[str, Any]) -> list[str]:
    files = ssh_config.get("userknownhostsfile")
    user_files = (files.split() if isinstance(files, str) else list(files or [])) or [
        "~/.ssh/known_hosts", "~/.ssh/known_hosts2"]
    global_files = ssh_config.get("globalknownhostsfile")
    system_files = (global_files.split() if isinstance(global_files, str)
                    else list(global_files or [])) or ["/etc/ssh/ssh_known_hosts"]
    return [os.path.expanduser(f) for f in user_files + system_files]


def _harden(connection: fabric.Connection, accept_new: bool) -> None:
    """Strict host keys and no agent forwarding on this connection and on every ProxyJump hop
    behind it."""
    hop: Any = connection
    while isinstance(hop, fabric.Connection):
        # Never forward the agent, whatever ~/.ssh/config says (Fabric honours ForwardAgent):
        # root on any target could sign in anywhere as the operator while a run lasts.
        hop.forward_agent = False
        files = known_hosts_files(hop.ssh_config)
        known = read_known_hosts(files)
        host_keys = hop.client.get_host_keys()
        for entry in known.entries:
            for name in entry.hostnames:
                host_keys.add(name, entry.key.get_name(), entry.key)
        # Deliberately strict even where ssh_config says StrictHostKeyChecking=no.
        hop.client.set_missing_host_key_policy(
            _StrictHostKeyPolicy(files[0], accept_new, known))
        hop.known_hosts = known
        hop = hop.gateway


class _PromptClient(paramiko.SSHClient):
    """Paramiko's client on a TCP socket with TCP_NODELAY from its first packet. Without it
    every command waits ~40 ms (its channel-open and exec requests are two small packets, and
    Nagle holds the second until the server acknowledges the first, which it delays), and so
    does the handshake, several times. A gateway's channel or a ProxyCommand is used as is."""

    def connect(self, hostname: str, port: int = 22, *, sock: Any = None,
                timeout: float | None = None, **kwargs: Any) -> None:
        if sock is None:
            sock = socket.create_connection((hostname, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connect(hostname, port, sock=sock, timeout=timeout, **kwargs)


class _PromptRunner(fabric.runners.Remote):
    """Fabric's runner, noticing a command's end within 2 ms instead of Invoke's 10 ms poll
    (most commands of a deploy take a few milliseconds on the host)."""

    input_sleep = 0.002


class RemoteHost(Host):
    """A host over SSH: an ~/.ssh/config alias or user@host:port."""

    def __init__(self, name: str, observer: CommandObserver | None = None, *,
                 ssh_config_path: str | None = None, accept_new_host_key: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 redact: Redact = _unredacted) -> None:
        super().__init__(name=name, observer=observer, redact=redact)
        # A fresh fabric.Config loads ~/.ssh/config (or the given file); one cloned from
        # Invoke's config would not.
        config = fabric.Config(runtime_ssh_path=ssh_config_path) if ssh_config_path \
            else fabric.Config()
        config.run.hide = True
        config.run.warn = True
        config.run.in_stream = False
        config.runners.remote = _PromptRunner
        kwargs: dict[str, Any] = {"banner_timeout": connect_timeout,
                                  "auth_timeout": connect_timeout}
        try:
            self._conn = fabric.Connection(name, config=config, connect_kwargs=kwargs,
                                           connect_timeout=int(connect_timeout))
        except ValueError as exc:
            raise HostUnreachableError(f"invalid host {name!r}: {exc}") from None
        self._accept_new = accept_new_host_key
        hop: Any = self._conn
        while isinstance(hop, fabric.Connection):
            hop.client = _PromptClient()
            hop = hop.gateway
        _harden(self._conn, accept_new_host_key)
        self._opened = 0
        self._last_used = 0.0
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def address(self) -> str:
        return f"{self._conn.user}@{self._conn.host}:{self._conn.port}"

    @property
    def connections_opened(self) -> int:
        return self._opened

    def _ensure_open(self) -> None:
        if self._conn.is_connected and not self._stale():
            self._last_used = time.monotonic()
            return
        if self._conn.is_connected:
            # Idle for a while (a pause, a drain, a long wait) and found dead by a probe:
            # reconnect before running anything, so no command is lost to a dead connection.
            with contextlib.suppress(Exception):
                self._conn.close()
        self._sftp = None
        try:
            self._conn.open()
        except HostError:
            raise
        except paramiko.BadHostKeyException as exc:
            if self._conn.known_hosts.is_revoked(exc.key):
                raise revoked_key_error(self.name, exc.key) from None
            raise HostKeyError(
                f"host key for {self.name} ({self.address}) has CHANGED: refused "
                f"(got {exc.key.get_name()} {fingerprint(exc.key)})",
                hint="This can mean a man-in-the-middle. If the host was really reinstalled, "
                     "remove the old key (`ssh-keygen -R HOST -f KNOWN_HOSTS`) and accept the "
                     "new one with `inv hosts.trust --env=ENV`.") from None
        except paramiko.AuthenticationException as exc:
            raise HostAuthError(
                f"authentication to {self.name} ({self.address}) failed: {exc}",
                hint="Check IdentityFile/User for this host in ~/.ssh/config and that the key "
                     "is in the remote authorized_keys.") from None
        except TimeoutError as exc:
            raise HostUnreachableError(
                f"cannot reach {self.name} ({self.address}): connection timed out"
                f"{f' ({exc})' if str(exc) else ''}") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            reason = _one_line(exc) or type(exc).__name__
            raise HostUnreachableError(
                f"cannot reach {self.name} ({self.address}): {reason}") from None
        self._opened += 1
        self._last_used = time.monotonic()
        transport = self._conn.transport
        if transport is not None:
            transport.set_keepalive(KEEPALIVE_SECONDS)

    def _stale(self) -> bool:
        """After IDLE_PROBE_SECONDS without use, check the connection with a no-op command;
        True when it is dead (the transport often learns of a cut only when it is used)."""
        if time.monotonic() - self._last_used < IDLE_PROBE_SECONDS:
            return False
        try:
            channel = self._conn.transport.open_session(timeout=IDLE_PROBE_TIMEOUT)
            channel.settimeout(IDLE_PROBE_TIMEOUT)
            channel.exec_command("true")
            alive = channel.recv_exit_status() == 0
            channel.close()
            return not alive
        except Exception:  # noqa: BLE001 - any failure of the probe means: reconnect
            return True

    def _run(self, command: str, timeout: float | None) -> Result:
        self._ensure_open()
        try:
            r = self._conn.run(command, hide=True, warn=True, in_stream=False, pty=False,
                               timeout=timeout)
        except CommandTimedOut as exc:
            raise CommandTimeoutError(
                f"command timed out after {exc.timeout:g} s on {self.name}") from None
        except (OSError, paramiko.SSHException, EOFError, ThreadException) as exc:
            raise HostError(f"connection to {self.name} lost: {_one_line(exc)}") from None
        if r.exited is None or r.exited < 0:
            # The channel closed without an exit status (paramiko reports -1; a real exit
            # status is 0-255): the connection went away mid-command.
            raise HostError(f"connection to {self.name} lost while a command was running "
                            f"({_summary(command)}); its outcome on the host is unknown",
                            hint="Every step is safe to run again: retry the operation.")
        return Result(command, r.exited, r.stdout, r.stderr, 0.0)

    def _sftp_client(self) -> paramiko.SFTPClient:
        self._ensure_open()
        if self._sftp is None:
            self._sftp = self._conn.client.open_sftp()
        return self._sftp

    def _write(self, path: str, data: bytes, mode: int) -> None:
        try:
            with _create_exclusive(self._sftp_client(), path, mode) as fh:
                # The server masks the requested mode with its umask: set it exactly, which
                # can only add bits the caller asked for (0644 after a umask of 027).
                fh.chmod(mode)
                fh.set_pipelined(True)
                fh.write(data)
        except OSError as exc:
            raise HostError(f"cannot write {path} on {self.name}: {_one_line(exc)}") from None
        except (paramiko.SSHException, EOFError) as exc:
            raise HostError(f"connection to {self.name} lost: {_one_line(exc)}") from None

    def _rename(self, src: str, dst: str) -> None:
        try:
            self._sftp_client().posix_rename(src, dst)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise HostError(f"cannot rename {src} to {dst} on {self.name}: "
                            f"{_one_line(exc)}") from None

    @contextlib.contextmanager
    def _channel(self, channel: paramiko.Channel, timeout: float | None) -> Iterator[None]:
        """A command's own channel: a timeout or a broken connection becomes the typed error,
        and the channel is closed on every exit path."""
        try:
            yield
        except TimeoutError:
            raise CommandTimeoutError(
                f"command timed out after {timeout:g} s on {self.name}") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise HostError(f"connection to {self.name} lost: {_one_line(exc)}") from None
        finally:
            channel.close()

    def _stream_into(self, command: str, source: IO[bytes], timeout: float) -> Result:
        self._ensure_open()
        transport = self._conn.transport
        channel = transport.open_session(timeout=CONNECT_TIMEOUT)
        # One deadline for the whole command: a per-operation timeout never fires while the
        # remote side (a hung `docker load`) just stays silent and the loop below polls.
        deadline = _Deadline(timeout)
        with self._channel(channel, timeout):
            channel.exec_command(command)
            while chunk := source.read(1 << 16):
                channel.settimeout(deadline.remaining())
                channel.sendall(chunk)
            channel.shutdown_write()
            stdout, stderr = io.BytesIO(), io.BytesIO()
            while True:
                deadline.remaining()
                if channel.recv_ready():
                    stdout.write(channel.recv(1 << 16))
                elif channel.recv_stderr_ready():
                    stderr.write(channel.recv_stderr(1 << 16))
                elif channel.exit_status_ready() and not channel.recv_ready() \
                        and not channel.recv_stderr_ready():
                    break
                else:
                    # Wakes as soon as the exit status arrives (output is polled).
                    channel.status_event.wait(0.05)
            status = channel.recv_exit_status()
        return Result(command, status, stdout.getvalue().decode(errors="replace"),
                      stderr.getvalue().decode(errors="replace"), 0.0)

    def _stream(self, command: str, lines: _Lines, stop: threading.Event,
                timeout: float | None) -> int:
        self._ensure_open()
        deadline = _Deadline(timeout) if timeout else None
        channel = self._conn.transport.open_session(timeout=CONNECT_TIMEOUT)
        with self._channel(channel, timeout):
            channel.exec_command(command)
            while not stop.is_set():
                if deadline is not None:
                    deadline.remaining()
                if channel.recv_ready():
                    lines.feed(channel.recv(1 << 16), False)
                elif channel.recv_stderr_ready():
                    lines.feed(channel.recv_stderr(1 << 16), True)
                elif channel.exit_status_ready():
                    break
                else:
                    time.sleep(STREAM_POLL_SECONDS)
            # Stopped: closing the channel closes the command's standard input.
            status = -1 if stop.is_set() else channel.recv_exit_status()
        if status < 0 and not stop.is_set():
            raise HostError(f"connection to {self.name} lost while a command was running "
                            f"({_summary(command)})")
        return status

    def _interact(self, command: str) -> int:
        self._ensure_open()
        try:
            r = self._conn.run(command, pty=True, warn=True, hide=False, in_stream=sys.stdin)
        except (OSError, paramiko.SSHException, EOFError, ThreadException) as exc:
            raise HostError(f"connection to {self.name} lost: {_one_line(exc)}") from None
        return r.exited

    def _tcp(self, address: str, port: int, timeout: float) -> paramiko.Channel:
        self._ensure_open()
        try:
            return self._conn.transport.open_channel(
                "direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:
            raise ConnectionRefusedError(f"connection refused ({exc.text})") from None
        except paramiko.SSHException as exc:
            raise ConnectionError(_one_line(exc)) from None

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
            self._conn.close()
        except (OSError, paramiko.SSHException, EOFError):
            pass


def _create_exclusive(sftp: paramiko.SFTPClient, path: str, mode: int) -> paramiko.SFTPFile:
    """Create `path` for writing (it must not exist) with `mode` from its first byte.

    `SFTPClient.open` sends no attributes, so the server creates the file with its default
    0666 & ~umask and a later chmod leaves a window in which another local user can open a
    secret. Here the mode travels in the SSH_FXP_OPEN request itself; OpenSSH's sftp-server
    passes it to open(2), which masks it with the umask: never wider than `mode`."""
    attrs = paramiko.SFTPAttributes()
    attrs.st_mode = mode
    flags = sftp_proto.SFTP_FLAG_WRITE | sftp_proto.SFTP_FLAG_CREATE | sftp_proto.SFTP_FLAG_EXCL
    kind, msg = sftp._request(sftp_proto.CMD_OPEN, sftp._adjust_cwd(path), flags, attrs)
    if kind != sftp_proto.CMD_HANDLE:
        raise paramiko.SFTPError("Expected handle")
    return paramiko.SFTPFile(sftp, msg.get_binary(), "wb")


def connect(name: str, observer: CommandObserver | None = None, *,
            accept_new_host_key: bool = False, redact: Redact = _unredacted) -> Host:
    """A host by its ssh name; `local` is this machine without SSH."""
    if name == LOCAL:
        return LocalHost(observer, redact)
    return RemoteHost(name, observer, accept_new_host_key=accept_new_host_key,
                      ssh_config_path=os.environ.get("TOGATHER_SSH_CONFIG"),
                      redact=redact)


class _Deadline:
    """Time left of one overall timeout; TimeoutError once it has passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self.seconds:g} s")
        return left


class _BoundedReader(io.RawIOBase):
    """Reads a socket or an SSH channel with a deadline for the whole answer and a size cap,
    so a server that drips bytes or never stops sending cannot hold a run."""

    def __init__(self, conn: Any, deadline: _Deadline) -> None:
        self.conn = conn
        self.deadline = deadline
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.conn.settimeout(self.deadline.remaining())
        data = self.conn.recv(min(len(buffer), HTTP_MAX_BYTES + 1 - self.total))
        self.total += len(data)
        if self.total > HTTP_MAX_BYTES:
            raise http.client.HTTPException(f"answer larger than {HTTP_MAX_BYTES} bytes")
        buffer[:len(data)] = data
        return len(data)


class _ReaderSocket:
    """What http.client.HTTPResponse needs of a socket: makefile()."""

    def __init__(self, reader: _BoundedReader) -> None:
        self.reader = reader

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self.reader)


class _TlsOver:
    """TLS over a connected socket or SSH channel: an ssl.SSLObject between two memory BIOs
    (ssl can only wrap real sockets; a paramiko channel is not one). Offers what
    _http_exchange uses of a socket: settimeout, sendall, recv. Every wait is bounded by the
    deadline of the whole exchange."""

    def __init__(self, conn: Any, context: ssl.SSLContext, server_name: str,
                 deadline: _Deadline) -> None:
        self.conn = conn
        self.deadline = deadline
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self._step(self.tls.do_handshake)
        self.certificate: bytes | None = self.tls.getpeercert(binary_form=True)

    def _step(self, operation: Callable[..., Any], *args: Any) -> Any:
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self.conn.settimeout(self.deadline.remaining())
                data = self.conn.recv(65536)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.conn.settimeout(self.deadline.remaining())
            self.conn.sendall(data)

    def settimeout(self, seconds: float) -> None:
        self.conn.settimeout(seconds)

    def sendall(self, data: bytes) -> None:
        self._step(self.tls.write, data)

    def recv(self, size: int) -> bytes:
        if size <= 0:
            return b""
        try:
            return self._step(self.tls.read, size)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # The server closed (with or without close_notify): the answer ends here, as
            # with Connection: close over plain HTTP.
            return b""


def _http_exchange(conn: Any, address: str, port: int, path: str,
                   deadline: _Deadline, headers: dict[str, str] | None = None) -> HttpResponse:
    """One GET over an open socket or direct-tcpip channel, bounded in time and size."""
    conn.settimeout(deadline.remaining())
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}:{port}\r\n"
                 f"Connection: close\r\nUser-Agent: togather-tasks\r\n{extra}\r\n".encode())
    resp = http.client.HTTPResponse(_ReaderSocket(_BoundedReader(conn, deadline)))  # type: ignore[arg-type]
    resp.begin()
    return HttpResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def _end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a local command started in a session of its own, and all it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)


def _summary(command: str) -> str:
    """The program a command line runs, for messages (`dbmate`, `docker compose`)."""
    words = command.split()
    for i, word in enumerate(words):
        if "=" in word or word in ("timeout", "sh", "&&") or word.startswith("-") \
                or word.isdigit():
            continue
        following = words[i + 1] if i + 1 < len(words) else ""
        return f"{word} {following}" if following.isalpha() and following.islower() else word
    return "command"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
