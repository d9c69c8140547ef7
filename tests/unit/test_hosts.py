"""The host adapter's own guarantees, with fakes where a real host cannot produce the fault:
no agent forwarding, an overall deadline for streamed commands, bounded HTTP answers."""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from paramiko import sftp as sftp_proto

from togather_tasks import hosts as hosts_module
from togather_tasks.errors import CommandTimeoutError
from togather_tasks.hosts import LocalHost, RemoteHost


def _ssh_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_agent_is_never_forwarded_even_when_ssh_config_asks(tmp_path: Path) -> None:
    config = _ssh_config(tmp_path, "Host target\n  HostName 192.0.2.1\n  ProxyJump gw\n"
                                   "Host *\n  ForwardAgent yes\n"
                                   f"  UserKnownHostsFile {tmp_path}/known_hosts\n")
    host = RemoteHost("target", ssh_config_path=config)
    assert host._conn.ssh_config.get("forwardagent") == "yes"
    assert host._conn.forward_agent is False
    assert host._conn.gateway.forward_agent is False


class _SilentChannel:
    """An SSH channel whose command never answers (a hung `docker load`)."""

    def __init__(self) -> None:
        self.closed = False
        self.status_event = threading.Event()  # paramiko sets it when the exit status comes

    def settimeout(self, seconds: float) -> None:
        self.timeout = seconds

    def exec_command(self, command: str) -> None:
        self.command = command

    def sendall(self, data: bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class _Transport:
    def __init__(self, channel: _SilentChannel) -> None:
        self.channel = channel

    def open_session(self, timeout: float) -> _SilentChannel:
        return self.channel


def test_a_streamed_command_that_never_ends_times_out(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = _ssh_config(tmp_path, f"Host *\n  UserKnownHostsFile {tmp_path}/known_hosts\n")
    host = RemoteHost("deploy@192.0.2.1", ssh_config_path=config)
    channel = _SilentChannel()
    monkeypatch.setattr(host, "_ensure_open", lambda: None)
    monkeypatch.setattr(host._conn, "transport", _Transport(channel))
    outcome: list[BaseException] = []

    def stream() -> None:
        try:
            host.stream_into("docker load", io.BytesIO(b"image bytes"), timeout=0.5)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "stream_into is still waiting after 10x its timeout"
    assert isinstance(outcome[0], CommandTimeoutError)
    assert "timed out after 0.5 s" in outcome[0].message
    assert channel.closed


@pytest.fixture
def http_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """`serve(answer)` -> a port where one connection is answered by `answer(conn)`."""
    servers: list[socket.socket] = []

    def serve(answer: Callable[[socket.socket], None]) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                with contextlib.suppress(OSError):  # the client hung up first: expected
                    answer(conn)

        threading.Thread(target=accept, daemon=True).start()
        return server.getsockname()[1]

    yield serve
    for server in servers:
        server.close()


def test_an_http_answer_that_drips_forever_is_bounded_in_time(http_server) -> None:
    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"x")
            time.sleep(0.1)

    port = http_server(drip)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        LocalHost().http_get("127.0.0.1", port, "/health", timeout=1)
    assert time.monotonic() - start < 3


def test_an_http_answer_that_never_ends_is_bounded_in_size(http_server) -> None:
    def flood(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(64):
            conn.sendall(b"x" * (1 << 16))  # 4 MiB in all, 4x the cap

    port = http_server(flood)
    with pytest.raises(http.client.HTTPException, match="larger than"):
        LocalHost().http_get("127.0.0.1", port, "/health", timeout=10)


def test_a_normal_http_answer_is_read_whole(http_server) -> None:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 17\r\n\r\n{\"status\":\"ok\"}\n\n")

    port = http_server(answer)
    resp = LocalHost().http_get("127.0.0.1", port, "/health", timeout=5)
    assert (resp.status, resp.headers["content-type"]) == (200, "application/json")
    assert resp.json() == {"status": "ok"}


def test_extra_request_headers_are_sent() -> None:
    """The proxy's verification token travels in a header, never on a command line."""
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            received.append(conn.recv(4096))
            conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    threading.Thread(target=echo, daemon=True).start()
    with server:
        resp = LocalHost().http_get("127.0.0.1", server.getsockname()[1], "/version",
                                    timeout=5, headers={"X-Togather-Verify": "0f" * 16})
    assert resp.status == 204
    assert f"\r\nX-Togather-Verify: {'0f' * 16}\r\n".encode() in received[0]


# --- issue 8 item 11: a secret file is never readable by others, not even for a moment ------


class _RecordingSFTP(paramiko.SFTPClient):
    """The client side of an SFTP session that records every request it would send, in order,
    and answers each as a server would that accepts it (no connection behind it)."""

    def __init__(self) -> None:  # no super().__init__: it would open a channel
        self.requests: list[tuple[int, tuple]] = []

    def _adjust_cwd(self, path: str) -> str:
        return path

    def _log(self, level: int, message: str) -> None:
        pass

    def _request(self, kind: int, *args: object) -> tuple[int, paramiko.Message | None]:
        self.requests.append((kind, args))
        if kind != sftp_proto.CMD_OPEN:
            return sftp_proto.CMD_STATUS, None
        handle = paramiko.Message()
        handle.add_string(b"handle-1")
        handle.rewind()
        return sftp_proto.CMD_HANDLE, handle

    def _async_request(self, fileobj: object, kind: int, *args: object) -> int:
        self.requests.append((kind, args))
        return len(self.requests)

    def _finish_responses(self, fileobj: object) -> None:
        pass


@pytest.mark.parametrize("mode", [0o600, 0o644], ids=oct)
def test_a_file_is_created_over_sftp_with_its_mode_in_the_open_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int) -> None:
    config = _ssh_config(tmp_path, f"Host *\n  UserKnownHostsFile {tmp_path}/known_hosts\n")
    host = RemoteHost("deploy@192.0.2.1", ssh_config_path=config)
    sftp = _RecordingSFTP()
    monkeypatch.setattr(host, "_sftp_client", lambda: sftp)

    host.write_file("/srv/togather/staging/app.env", b"SECRET_KEY=x\n", mode=mode)

    (open_kind, (path, flags, attrs)), *then = sftp.requests
    assert open_kind == sftp_proto.CMD_OPEN and path.endswith(".tmp")
    assert attrs.st_mode == mode, "the mode must be asked for when the file is created"
    assert flags & sftp_proto.SFTP_FLAG_EXCL and flags & sftp_proto.SFTP_FLAG_CREATE
    kinds = [kind for kind, _ in then]
    assert kinds == [sftp_proto.CMD_FSETSTAT, sftp_proto.CMD_WRITE, sftp_proto.CMD_CLOSE,
                     sftp_proto.CMD_EXTENDED]
    assert then[0][1][1].st_mode == mode


def test_a_local_file_is_created_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    LocalHost().write_file(str(path), b"SECRET_KEY=x\n", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600


def test_every_hop_connects_over_a_socket_that_sends_without_delay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TCP_NODELAY from the first packet, on the connection and on its ProxyJump gateway: each
    command is a channel-open and an exec request, two small packets Nagle would hold ~40 ms
    apart (and the handshake has several such pairs)."""
    config = _ssh_config(tmp_path, "Host target\n  HostName 192.0.2.1\n  ProxyJump gw\n"
                                   f"Host *\n  UserKnownHostsFile {tmp_path}/known_hosts\n")
    host = RemoteHost("target", ssh_config_path=config)
    hops = [host._conn, host._conn.gateway]
    assert all(isinstance(hop.client, hosts_module._PromptClient) for hop in hops)
    handed: list[socket.socket] = []
    monkeypatch.setattr(paramiko.SSHClient, "connect",
                        lambda self, hostname, port, *, sock, **kw: handed.append(sock))
    with socket.create_server(("127.0.0.1", 0)) as server:
        hops[1].client.connect("127.0.0.1", server.getsockname()[1], timeout=5)
        with handed[0] as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_socket_given_to_the_client_is_used_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway's direct-tcpip channel (or a ProxyCommand) is not a TCP socket of ours."""
    handed: list[object] = []
    monkeypatch.setattr(paramiko.SSHClient, "connect",
                        lambda self, hostname, port, *, sock, **kw: handed.append(sock))
    channel = object()
    hosts_module._PromptClient().connect("target", 22, sock=channel, timeout=5)
    assert handed == [channel]


def test_commands_and_file_writes_are_counted(tmp_path: Path) -> None:
    host = LocalHost()
    host.run("true")
    host.stream_into("cat > /dev/null", io.BytesIO(b"x"), timeout=10)
    host.write_file(str(tmp_path / "a"), b"a")
    host.write_temp(str(tmp_path), b"b")
    assert (host.commands_run, host.files_written) == (2, 2)
