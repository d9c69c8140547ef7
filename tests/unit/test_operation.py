"""SlotOperation and Deploy's failure path against in-memory hosts and a real state store in a
temporary directory: what a failure undoes (and what it must not), the lock checked before
destructive steps, hooks and webhooks that cannot turn an outcome around, redaction."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from togather_tasks import hooks, notify, proxy
from togather_tasks.config import Settings
from togather_tasks.deploy import Deploy, DeployOptions
from togather_tasks.errors import ExitCode, Interrupted, LockLostError, TogatherError
from togather_tasks.lock import Operator
from togather_tasks.operation import Release, Step
from togather_tasks.slots import Slots
from togather_tasks.ulid import new_id

from .fakehost import FakeHost, FakeSession, ProxyDisk, answer, stop_fragment
from .projects import JWT_SECRET
from .test_slots import proxy_running

SHA = "abc1234" + "0" * 33


@pytest.fixture
def session(settings: Settings, tmp_path: Path) -> FakeSession:
    session = FakeSession(settings, tmp_path / "state")
    for host in session.all_hosts:
        ProxyDisk(host, session.settings)
    return session


def new_deploy(session: FakeSession) -> Deploy:
    deploy = Deploy(session, DeployOptions())  # type: ignore[arg-type]
    deploy.release = Release(SHA, f"togather-server:{SHA[:7]}")
    deploy.slots = Slots("green", "blue")  # as validate plans them; the lock step settles them
    return deploy


def table(*names: str) -> tuple[Step, ...]:
    """Rows of the deploy's own runbook, by name."""
    rows = {row.name: row for row in Deploy.steps}
    return tuple(rows[name] for name in names)


def serving(host: FakeHost, slot: str) -> None:
    """The host's slot marker names `slot` and its proxy answers from it."""
    host.disk.mark(slot)
    host.http = lambda *a: answer(200, slot=slot, body=b'{"version": "old1234"}')


def stops(host: FakeHost, slot: str) -> list[str]:
    return host.ran(stop_fragment(slot))


def step(name: str, action=lambda: None, *, destructive: bool = False) -> Step:
    return Step(name, name, lambda operation, note: action(), destructive=destructive)


def raising(name: str, exc: BaseException) -> Step:
    def action() -> None:
        raise exc
    return step(name, action)


def started_deploy(session: FakeSession, *later: Step) -> Deploy:
    """A deploy from blue to green: the lock taken, green started, then `later` steps."""
    deploy = new_deploy(session)
    for host in session.all_hosts:
        serving(host, "blue")
    deploy.run_steps((*table("lock", "start"), *later))
    return deploy


def history(session: FakeSession) -> list[dict]:
    return session.store.read().state.history


# --- item 1: never stop the slot a proxy routes to -----------------------------------------


def test_failure_after_a_cut_switch_leaves_the_slot_the_proxy_routes_to_running(
        session: FakeSession) -> None:
    host = session.primary

    def switch_cut_before_restore() -> None:
        serving(host, "green")  # the marker was renamed, then the connection dropped
        raise TogatherError("connection lost during the switch")

    with pytest.raises(TogatherError):
        started_deploy(session, step("switch", switch_cut_before_restore))
    assert stops(host, "green") == []
    assert "left the new green slot running on web1: its proxy routes traffic to it" \
        in session.output


def test_failure_before_the_switch_stops_the_new_slot(session: FakeSession) -> None:
    with pytest.raises(TogatherError):
        started_deploy(session, raising("health", TogatherError("unhealthy")))
    assert len(stops(session.primary, "green")) == 1


def test_proxy_down_the_slot_marker_says_where_it_routes(session: FakeSession) -> None:
    host = session.primary

    def proxy_died_after_the_switch() -> None:
        host.disk.mark("green")
        host.http = FakeHost._refuse
        raise TogatherError("proxy died")

    with pytest.raises(TogatherError):
        started_deploy(session, step("switch", proxy_died_after_the_switch))
    assert stops(host, "green") == []


# --- item 2: the lock is checked before each destructive step -------------------------------


def test_a_lock_broken_mid_step_stops_the_deploy_before_switch(session: FakeSession) -> None:
    switched = []

    def lock_broken_by_another_operator() -> None:
        session.store.release_where(lambda lock: True)
        session.store.acquire(Operator("bob@example.com", "bob-laptop", 4242),
                              deployment_id=new_id("dep"), operation="deploy",
                              timeout_minutes=30)

    with pytest.raises(LockLostError) as caught:
        started_deploy(session, step("health", lock_broken_by_another_operator),
                       step("switch", lambda: switched.append(True), destructive=True))

    assert caught.value.exit_code == ExitCode.LOCK_HELD
    assert "stopping before switch" in caught.value.message
    assert switched == []
    assert stops(session.primary, "green") == []  # it may be bob's slot by now
    state = session.store.read().state
    assert state.lock["locked_by"] == "bob@example.com"  # bob's lock is left alone
    assert history(session) == []


# --- item 4: every exception runs the failure path -------------------------------------------


def test_an_unexpected_exception_runs_the_failure_path(session: FakeSession) -> None:
    with pytest.raises(http.client.HTTPException):
        started_deploy(session, raising("switch", http.client.BadStatusLine("garbage")))

    assert len(stops(session.primary, "green")) == 1
    [entry] = history(session)
    assert entry["status"] == "failed"
    assert "internal error: BadStatusLine" in entry["message"]
    assert session.store.read().state.lock == {"locked": False}


def test_a_crashing_post_hook_or_webhook_does_not_fail_a_good_operation(
        session: FakeSession, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks, "run_hook", crash)
    monkeypatch.setattr(notify, "notify", crash)
    deploy = new_deploy(session)

    deploy.run_hook("post-deploy", "succeeded")
    deploy.notify("completed")

    assert "hook post-deploy could not run (RuntimeError: boom)" in session.output


def test_a_blocking_hook_still_stops_the_operation(session: FakeSession) -> None:
    hook = hooks.hook_path(session.settings.root, "pre-deploy")
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(hooks.HookFailed):
        new_deploy(session).run_hook("pre-deploy", "starting", blocking=True)


# --- item 10: the failure message is redacted where it is made --------------------------------


def test_failure_message_is_redacted_in_history_hook_and_webhook(
        session: FakeSession, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen_by_hook = tmp_path / "hook-error"
    hook = hooks.hook_path(session.settings.root, "on-failure")
    hook.parent.mkdir(parents=True)
    hook.write_text(f'#!/bin/sh\nprintf %s "$TOGATHER_ERROR" > {seen_by_hook}\n')
    hook.chmod(0o755)
    monkeypatch.setattr(notify, "webhook_url", lambda settings: "http://hooks.invalid/x")
    posted = []
    monkeypatch.setattr(notify.requests, "post",
                        lambda url, json, **kw: posted.append(json) or answer(204))
    leak = TogatherError(f"the app printed JWT_SECRET={JWT_SECRET} and {JWT_SECRET}")

    with pytest.raises(TogatherError):
        started_deploy(session, raising("health", leak))

    [entry] = history(session)
    for text in (entry["message"], seen_by_hook.read_text(), json.dumps(posted)):
        assert JWT_SECRET not in text
    assert "the app printed" in entry["message"]


# --- item 1: the switch restores the previous slot marker on any exception -------------------


def test_an_interrupt_during_the_switch_restores_the_previous_slot_marker(
        settings: Settings) -> None:
    host = FakeHost()
    disk = ProxyDisk(host, settings)
    disk.load_site(settings)
    disk.mark("blue")

    def sigterm_while_verifying(*args):
        raise Interrupted("SIGTERM")

    host.http = sigterm_while_verifying
    proxy_running(host, settings)
    with pytest.raises(Interrupted):
        proxy.switch(settings, host, "green", "abc1234")
    assert disk.slot == "blue"
    assert len(host.ran("mv -fT")) == 2  # the switch, then the restore
    assert host.ran("nginx -s reload") == []
