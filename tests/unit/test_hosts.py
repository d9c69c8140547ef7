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

import pytest

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
