"""The pure parts of the everyday commands (issue 11): durations, host choice, line
prefixes and filters, audit records, waiting for a held lock, pruning after a deploy."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from togather_tasks import cleanup
from togather_tasks.audit import format_record, parse_record
from togather_tasks.errors import LockHeldError, UsageError
from togather_tasks.execute import check_exec
from togather_tasks.hosts import _Lines
from togather_tasks.lease import wait_for_lock
from togather_tasks.logs import (
    LogRequest,
    check_request,
    choose_hosts,
    line_printer,
    parse_duration,
)
from togather_tasks.output import Console
from togather_tasks.redact import Redactor
from togather_tasks.state import State

from .fakehost import FakeSession, ok


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), (" 5M ", 300)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "1w", "1h 30m", "-5m", "2024-01-01",
                                  "10m; rm -rf /"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--since"):
        parse_duration(text)


@pytest.mark.parametrize("request_, problem", [
    (LogRequest(slot="purple"), "--slot"), (LogRequest(lines=0), "--lines"),
    (LogRequest(since="soon"), "--since")])
def test_check_request_refuses(request_: LogRequest, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        check_request(request_)


def test_choose_hosts() -> None:
    fleet = ("web1", "web2", "web3")
    assert choose_hosts(fleet, None) == ["web1", "web2", "web3"]
    assert choose_hosts(fleet, "web3, web1") == ["web3", "web1"]
    with pytest.raises(UsageError, match="web9"):
        choose_hosts(fleet, "web1,web9")
    with pytest.raises(UsageError):
        choose_hosts(fleet, ",")


def test_lines_are_prefixed_with_their_host_only_when_there_are_several() -> None:
    seen: list[tuple[str, bool]] = []
    line_printer("web1", True, None, lambda *a: seen.append(a))("started", False)
    line_printer("web1", False, None, lambda *a: seen.append(a))("started", True)
    assert seen == [("[web1] started", False), ("started", True)]


def test_grep_keeps_the_lines_containing_the_text() -> None:
    seen: list[str] = []
    sink = line_printer("web1", True, "ERROR", lambda line, _: seen.append(line))
    for line in ("INFO ok", "ERROR boom", "error lower"):
        sink(line, False)
    assert seen == ["[web1] ERROR boom"]


def test_streamed_bytes_become_whole_lines() -> None:
    seen: list[tuple[str, bool]] = []
    lines = _Lines(lambda *a: seen.append(a))
    lines.feed(b"one\r\ntw", False)
    lines.feed(b"o \xc3", False)  # a character cut in two by the reads
    lines.feed(b"\xa9\n", False)
    lines.feed(b"bad\n", True)
    lines.feed(b"tail", False)
    lines.flush()
    assert seen == [("one", False), ("two \u00e9", False), ("bad", True), ("tail", False)]
    assert lines.stderr == "bad"


def test_check_exec() -> None:
    assert check_exec("ls", "new") == "ls"
    with pytest.raises(UsageError, match="--slot"):
        check_exec("ls", "old")
    with pytest.raises(UsageError, match="--command"):
        check_exec("  ", "active")


def test_audit_records_are_formatted_newest_last_and_bad_lines_kept() -> None:
    record = parse_record('{"ts": "2026-01-02T03:04:05Z", "operation": "deploy", '
                          '"result": "succeeded", "by": "a@example.com", "environment": '
                          '"staging", "version": "abc1234", "slot": "green"}')
    assert format_record(record) == ("2026-01-02T03:04:05Z  deploy  succeeded  a@example.com"
                                     "  slot=green  version=abc1234")
    assert format_record(parse_record('{"ts": "x", "operation": "lock.release"}')) == \
        "x  lock.release  -  -"
    assert parse_record("not json") == {"raw": "not json"}
    assert parse_record("[1]") == {"raw": "[1]"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def quiet_console() -> Console:
    return Console(Redactor(), stream=io.StringIO(), err=io.StringIO())


def held_until(clock: Clock, free_at: float):
    def attempt() -> str:
        if clock.now < free_at:
            raise LockHeldError("staging is locked by bob@example.com", hint="wait")
        return "lock"
    return attempt


def test_wait_for_lock_polls_with_backoff_until_the_lock_is_free() -> None:
    clock, console = Clock(), quiet_console()
    assert wait_for_lock(held_until(clock, 25), wait_seconds=60, console=console,
                         clock=clock, sleep=clock.sleep) == "lock"
    assert clock.sleeps[:4] == [0.5, 1.0, 2.0, 2.0]
    assert max(clock.sleeps) == 2.0
    said = console.err.getvalue().splitlines()
    assert said[0] == ("warning: staging is locked by bob@example.com; waiting up to 60 s "
                       "for it")
    assert [line.split("(")[0] for line in said[1:]] == ["still waiting for the lock "] * 2


def test_wait_for_lock_gives_up_after_the_wait() -> None:
    clock = Clock()
    with pytest.raises(LockHeldError, match="still held after waiting 5 s") as raised:
        wait_for_lock(held_until(clock, 100), wait_seconds=5, console=quiet_console(),
                      clock=clock, sleep=clock.sleep)
    assert raised.value.hint == "wait"
    assert clock.now == 5


def test_without_a_wait_a_held_lock_fails_at_once() -> None:
    clock, console = Clock(), quiet_console()
    with pytest.raises(LockHeldError, match="^staging is locked by bob@example.com\nwait$"):
        wait_for_lock(held_until(clock, 1), wait_seconds=0, console=console, clock=clock,
                      sleep=clock.sleep)
    assert clock.sleeps == [] and console.err.getvalue() == ""


def deployed(*versions: str) -> State:
    """Each version deployed in turn: the last is current, all are in the history."""
    state = State.empty("staging")
    for n, version in enumerate(versions):
        state.previous, state.current = state.current, {"version": version, "id": f"dep_{n}"}
        state.history.insert(0, state.current)
    return state


def test_prune_after_deploy_keeps_current_previous_and_the_newest(settings,
                                                                  tmp_path: Path) -> None:
    session = FakeSession(settings, tmp_path)
    host = session.primary
    host.on("docker image ls", ok("eeeeeee\nddddddd\nccccccc\nbbbbbbb\naaaaaaa\n"))
    host.on("ls -1", ok("aaaaaaa\nbbbbbbb\nccccccc\nddddddd\neeeeeee\n.tmp\n"))
    host.on("docker image rm togather-server:bbbbbbb", ok())
    history = ("aaaaaaa", "bbbbbbb", "ccccccc", "ddddddd", "eeeeeee")
    report = cleanup.prune_after_deploy(session, deployed(*history))
    # keep_images 5 by default: nothing; with 3, the newest other image stays too.
    assert report.images["web1"] == []
    session.settings = dataclasses.replace(settings, deployment={
        **settings.deployment, "keep_images": 3})
    report = cleanup.prune_after_deploy(session, deployed(*history))
    assert report.images["web1"] == ["togather-server:bbbbbbb", "togather-server:aaaaaaa"]
    assert report.releases["web1"] == ["aaaaaaa", "bbbbbbb"]
    assert host.ran("rm -rf /srv/togather/staging/releases/aaaaaaa")


def test_prune_after_deploy_never_touches_a_tag_this_environment_never_deployed(
        settings, tmp_path: Path) -> None:
    """Another environment (or app) sharing the image name on this engine may be about to
    start a tag it just built: not ours to remove, however old it looks."""
    session = FakeSession(settings, tmp_path)
    session.settings = dataclasses.replace(settings, deployment={
        **settings.deployment, "keep_images": 2})
    host = session.primary
    host.on("docker image ls", ok("fffffff\neeeeeee\nddddddd\nccccccc\n"))
    host.on("ls -1", ok(""))
    host.on("docker image rm togather-server:ccccccc", ok())
    report = cleanup.prune_after_deploy(session, deployed("ccccccc", "ddddddd", "eeeeeee"))
    assert report.images["web1"] == ["togather-server:ccccccc"]
    assert not host.ran("docker image rm togather-server:fffffff")


def test_prune_after_deploy_only_warns_when_it_fails(settings, tmp_path: Path) -> None:
    session = FakeSession(settings, tmp_path)
    session.primary.on("docker image ls", lambda _c: (_ for _ in ()).throw(OSError("gone")))
    report = cleanup.prune_after_deploy(session, deployed("ddddddd", "eeeeeee"))
    assert report.images == {}
    assert "could not prune old images (gone)" in session.output
