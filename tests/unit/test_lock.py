"""Lock rules (pure): who may take the lock, given the recorded lock, the clock and whether the
recorded holder process is alive."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest

from togather_tasks.lock import Operator, decide, describe, human_duration, new_lock, renewed
from togather_tasks.state import State, parse_iso
from togather_tasks.ulid import ULID_RE

T0 = datetime(2026, 1, 28, 15, 0, tzinfo=UTC)
HOLDER = Operator(email="alice@example.com", hostname="alice-laptop", pid=4242)
DEPLOYMENT_ID = "dep_01JBQR7KXYZABCDEFGHJKMNPQR"


def held(*, with_pid: bool = True, hostname: str = "alice-laptop", **kw) -> dict:
    operator = Operator(email=HOLDER.email, hostname=hostname, pid=HOLDER.pid)
    return new_lock(operator, deployment_id=DEPLOYMENT_ID, now=T0, timeout_minutes=30,
                    operation=kw.pop("operation", "deploy"), with_pid=with_pid, **kw)


def alive(_pid: int) -> bool:
    return True


def dead(_pid: int) -> bool:
    return False


def never_asked(pid: int) -> bool:
    raise AssertionError(f"process_alive({pid}) must not be called here")


def test_unlocked_is_acquired() -> None:
    decision = decide({"locked": False}, now=T0, force=False, local_hostname="bob-laptop",
                      process_alive=never_asked)
    assert decision.acquire and decision.replaced is None
    assert decision.reason == "unlocked"


def test_fresh_lock_of_a_live_holder_is_refused() -> None:
    lock = held()
    decision = decide(lock, now=T0 + timedelta(minutes=5), force=False,
                      local_hostname="alice-laptop", process_alive=alive)
    assert not decision.acquire
    assert decision.replaced == lock


def test_fresh_lock_on_another_machine_is_refused() -> None:
    decision = decide(held(), now=T0 + timedelta(minutes=29, seconds=59), force=False,
                      local_hostname="bob-laptop", process_alive=alive)
    assert not decision.acquire


@pytest.mark.parametrize("after", [timedelta(minutes=30), timedelta(hours=5)])
def test_expired_lock_is_taken_over_with_a_reason(after: timedelta) -> None:
    lock = held()
    decision = decide(lock, now=T0 + after, force=False, local_hostname="bob-laptop",
                      process_alive=alive)
    assert decision.acquire
    assert decision.replaced == lock
    assert "expired" in decision.reason and "2026-01-28T15:30:00Z" in decision.reason


def test_dead_holder_on_this_machine_is_taken_over() -> None:
    asked: list[int] = []

    def process_alive(pid: int) -> bool:
        asked.append(pid)
        return False

    lock = held()
    decision = decide(lock, now=T0 + timedelta(minutes=1), force=False,
                      local_hostname="alice-laptop", process_alive=process_alive)
    assert decision.acquire
    assert decision.replaced == lock
    assert asked == [4242]
    assert "pid 4242" in decision.reason and "gone" in decision.reason


def test_dead_pid_on_another_machine_cannot_be_proven_and_is_refused() -> None:
    decision = decide(held(hostname="ci-runner-7"), now=T0 + timedelta(minutes=1), force=False,
                      local_hostname="alice-laptop", process_alive=never_asked)
    assert not decision.acquire


def test_manual_lock_without_pid_is_refused_until_it_expires() -> None:
    lock = held(with_pid=False, operation="manual", message="db maintenance")
    assert "pid" not in lock
    before = decide(lock, now=T0 + timedelta(minutes=29), force=False,
                    local_hostname="alice-laptop", process_alive=never_asked)
    after = decide(lock, now=T0 + timedelta(minutes=30), force=False,
                   local_hostname="alice-laptop", process_alive=never_asked)
    assert not before.acquire
    assert after.acquire and after.replaced == lock


def test_force_takes_over_a_live_lock_and_names_it() -> None:
    lock = held()
    decision = decide(lock, now=T0 + timedelta(minutes=1), force=True,
                      local_hostname="bob-laptop", process_alive=alive)
    assert decision.acquire
    assert decision.replaced == lock
    assert decision.reason == "--force"


def test_force_on_an_unlocked_environment_replaces_nothing() -> None:
    decision = decide({"locked": False}, now=T0, force=True, local_hostname="x",
                      process_alive=never_asked)
    assert decision.acquire and decision.replaced is None


def test_new_lock_fields() -> None:
    lock = held(message="why")
    assert lock["locked"] is True
    assert lock["lock_id"].startswith("lock_") and ULID_RE.match(lock["lock_id"][5:])
    assert lock["locked_by"] == "alice@example.com"
    assert lock["locked_at"] == "2026-01-28T15:00:00Z"
    assert parse_iso(lock["lock_expires_at"]) - parse_iso(lock["locked_at"]) == \
        timedelta(minutes=30)
    assert lock["deployment_id"] == DEPLOYMENT_ID
    assert (lock["pid"], lock["hostname"]) == (4242, "alice-laptop")
    assert (lock["operation"], lock["message"]) == ("deploy", "why")


@pytest.mark.parametrize("minutes", [1, 30, 90])
def test_lock_expiry_follows_the_timeout(minutes: int) -> None:
    lock = new_lock(HOLDER, deployment_id=DEPLOYMENT_ID, now=T0, timeout_minutes=minutes,
                    operation="deploy")
    assert parse_iso(lock["lock_expires_at"]) == T0 + timedelta(minutes=minutes)


def test_each_new_lock_has_a_new_id() -> None:
    assert held()["lock_id"] != held()["lock_id"]


def test_renewed_pushes_the_expiry_and_keeps_the_rest() -> None:
    lock = held()
    later = T0 + timedelta(minutes=20)
    new = renewed(lock, later, 30)
    assert new["lock_expires_at"] == "2026-01-28T15:50:00Z"
    assert {k: v for k, v in new.items() if k != "lock_expires_at"} == \
        {k: v for k, v in lock.items() if k != "lock_expires_at"}


def test_describe_names_holder_age_and_expiry() -> None:
    text = describe(held(message="hotfix"), T0 + timedelta(minutes=4, seconds=12))
    assert "alice@example.com" in text
    assert "pid 4242" in text and "alice-laptop" in text
    assert DEPLOYMENT_ID in text
    assert "for 4m12s" in text
    assert "expires in 25m48s" in text
    assert "'hotfix'" in text


def test_describe_an_expired_lock() -> None:
    text = describe(held(), T0 + timedelta(hours=2))
    assert "for 2h00m" in text
    assert "expired 1h30m ago" in text


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (59, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (-5, "0s"),
])
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(timedelta(seconds=seconds)) == text


@pytest.mark.parametrize("with_pid", [True, False])
def test_lock_in_state_validates_against_the_original_schema(
        compat_schema: Callable[[str], dict], with_pid: bool) -> None:
    validator = jsonschema.Draft202012Validator(
        compat_schema("deployment-state.schema.json"),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    lock = held(with_pid=with_pid, message="maintenance")
    document = State.empty("production").with_lock(lock).to_document()
    assert list(validator.iter_errors(document)) == []
    assert list(validator.iter_errors({**document, "lock": renewed(lock, T0, 45)})) == []
