"""Lock rules (pure): who may take the lock, given the recorded lock, the host's clock and
whether the recorded holder process is provably gone (same machine, same boot, pid free or
reused)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from togather_tasks import lock as lockrules
from togather_tasks.lock import (
    Operator,
    decide,
    describe,
    human_duration,
    is_mine,
    new_lock,
    process_start_time,
    read_machine_id,
    renewed,
)
from togather_tasks.state import State, parse_iso
from togather_tasks.ulid import ULID_RE

T0 = datetime(2026, 1, 28, 15, 0, tzinfo=UTC)
MACHINE_A, BOOT_A = "a" * 32, "aaaaaaaa-0000-4000-8000-000000000001"
MACHINE_B, BOOT_B = "b" * 32, "bbbbbbbb-0000-4000-8000-000000000002"
HOLDER = Operator(email="alice@example.com", hostname="alice-laptop", pid=4242,
                  machine_id=MACHINE_A, boot_id=BOOT_A, process_started="ticks:1000")
# Another process on the holder's own machine, in the same boot.
SAME_MACHINE = Operator(email="alice@example.com", hostname="alice-laptop", pid=5151,
                        machine_id=MACHINE_A, boot_id=BOOT_A, process_started="ticks:2000")
BOB = Operator(email="bob@example.com", hostname="bob-laptop", pid=77, machine_id=MACHINE_B,
               boot_id=BOOT_B)
DEPLOYMENT_ID = "dep_01JBQR7KXYZABCDEFGHJKMNPQR"


def held(*, with_pid: bool = True, hostname: str = "alice-laptop", **kw) -> dict:
    operator = Operator(email=HOLDER.email, hostname=hostname, pid=HOLDER.pid,
                        machine_id=HOLDER.machine_id, boot_id=HOLDER.boot_id,
                        process_started=HOLDER.process_started)
    return new_lock(operator, deployment_id=DEPLOYMENT_ID, now=T0, timeout_minutes=30,
                    operation=kw.pop("operation", "deploy"), with_pid=with_pid, **kw)


def alive(_pid: int) -> bool:
    return True


def dead(_pid: int) -> bool:
    return False


def never_asked(pid: int) -> bool:
    raise AssertionError(f"process_alive({pid}) must not be called here")


def started_at(token: str | None) -> Callable[[int], str | None]:
    return lambda _pid: token


def judge(lock: dict, *, now: datetime, here: Operator = BOB, force: bool = False,
          process_alive: Callable[[int], bool] = never_asked,
          start_time: Callable[[int], str | None] = never_asked):
    return decide(lock, now=now, force=force, here=here, process_alive=process_alive,
                  start_time=start_time)


def test_unlocked_is_acquired() -> None:
    decision = judge({"locked": False}, now=T0)
    assert decision.acquire and decision.replaced is None
    assert decision.reason == "unlocked"


def test_fresh_lock_of_a_live_holder_is_refused() -> None:
    lock = held()
    decision = judge(lock, now=T0 + timedelta(minutes=5), here=SAME_MACHINE,
                     process_alive=alive, start_time=started_at("ticks:1000"))
    assert not decision.acquire
    assert decision.replaced == lock


def test_fresh_lock_on_another_machine_is_refused() -> None:
    decision = judge(held(), now=T0 + timedelta(minutes=29, seconds=59))
    assert not decision.acquire


@pytest.mark.parametrize("after", [timedelta(minutes=30), timedelta(hours=5)])
def test_expired_lock_is_taken_over_with_a_reason(after: timedelta) -> None:
    lock = held()
    decision = judge(lock, now=T0 + after)
    assert decision.acquire
    assert decision.replaced == lock
    assert "expired" in decision.reason and "2026-01-28T15:30:00Z" in decision.reason


def test_dead_holder_on_this_machine_is_taken_over() -> None:
    asked: list[int] = []

    def process_alive(pid: int) -> bool:
        asked.append(pid)
        return False

    lock = held()
    decision = judge(lock, now=T0 + timedelta(minutes=1), here=SAME_MACHINE,
                     process_alive=process_alive)
    assert decision.acquire
    assert decision.replaced == lock
    assert asked == [4242]
    assert "pid 4242" in decision.reason and "gone" in decision.reason


def test_dead_pid_on_another_machine_cannot_be_proven_and_is_refused() -> None:
    decision = judge(held(hostname="ci-runner-7"), now=T0 + timedelta(minutes=1))
    assert not decision.acquire


def test_a_namesake_machine_never_judges_the_holder_gone() -> None:
    """Two laptops both called alice-laptop: the other one's pid table proves nothing."""
    namesake = Operator(email="carol@example.com", hostname="alice-laptop", pid=9,
                        machine_id=MACHINE_B, boot_id=BOOT_A)
    decision = judge(held(), now=T0 + timedelta(minutes=1), here=namesake)
    assert not decision.acquire


def test_a_cloned_vm_with_the_same_machine_id_never_judges_the_holder_gone() -> None:
    clone = Operator(email="alice@example.com", hostname="alice-laptop", pid=9,
                     machine_id=MACHINE_A, boot_id=BOOT_B)
    decision = judge(held(), now=T0 + timedelta(minutes=1), here=clone)
    assert not decision.acquire


def test_a_reused_pid_is_a_gone_holder() -> None:
    decision = judge(held(), now=T0 + timedelta(minutes=1), here=SAME_MACHINE,
                     process_alive=alive, start_time=started_at("ticks:99999"))
    assert decision.acquire and "gone" in decision.reason


@pytest.mark.parametrize("now_started", ["ticks:1000", None])
def test_a_live_holder_or_an_unknown_start_time_is_not_gone(now_started: str | None) -> None:
    decision = judge(held(), now=T0 + timedelta(minutes=1), here=SAME_MACHINE,
                     process_alive=alive, start_time=started_at(now_started))
    assert not decision.acquire


def test_a_lock_without_machine_id_waits_for_its_expiry() -> None:
    """Written by an older version (hostname and pid only): nothing proves the holder gone."""
    lock = {k: v for k, v in held().items() if k not in ("machine_id", "boot_id")}
    decision = judge(lock, now=T0 + timedelta(minutes=1), here=SAME_MACHINE,
                     process_alive=dead)
    assert not decision.acquire


def test_an_operator_without_machine_id_never_judges_a_holder_gone() -> None:
    anonymous = Operator(email="alice@example.com", hostname="alice-laptop", pid=9)
    decision = judge(held(), now=T0 + timedelta(minutes=1), here=anonymous)
    assert not decision.acquire


def test_manual_lock_without_pid_is_refused_until_it_expires() -> None:
    lock = held(with_pid=False, operation="manual", message="db maintenance")
    assert "pid" not in lock
    before = judge(lock, now=T0 + timedelta(minutes=29), here=SAME_MACHINE)
    after = judge(lock, now=T0 + timedelta(minutes=30), here=SAME_MACHINE)
    assert not before.acquire
    assert after.acquire and after.replaced == lock


def test_force_takes_over_a_live_lock_and_names_it() -> None:
    lock = held()
    decision = judge(lock, now=T0 + timedelta(minutes=1), force=True)
    assert decision.acquire
    assert decision.replaced == lock
    assert decision.reason == "--force"


def test_force_on_an_unlocked_environment_replaces_nothing() -> None:
    decision = judge({"locked": False}, now=T0, force=True)
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
    assert (lock["machine_id"], lock["boot_id"], lock["process_started"]) == \
        (MACHINE_A, BOOT_A, "ticks:1000")
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


# --- odd or hostile lock fields --------------------------------------------------------------


@pytest.mark.parametrize("expires", ["9999-12-31T23:59:59-23:59", "2026-01-28t15:30:00z"])
def test_odd_timestamps_that_the_schema_accepts_never_crash(expires: str) -> None:
    lock = {**held(), "lock_expires_at": expires, "locked_at": expires}
    assert State.from_json(
        State.empty("staging").with_lock(lock).to_json(), "state", "staging").lock == lock
    decision = judge(lock, now=T0)
    text = describe(lock, T0)
    assert "alice@example.com" in text
    if parse_iso(expires) is None:
        assert not decision.acquire and "unreadable" in decision.reason
        assert "unreadable" in text
        assert judge(lock, now=T0, force=True).acquire
    else:
        assert parse_iso(expires) == datetime(2026, 1, 28, 15, 30, tzinfo=UTC)
        assert not decision.acquire


def test_parse_iso_reads_a_lowercase_timestamp_and_refuses_nonsense() -> None:
    assert parse_iso("2026-01-28t15:30:00z") == datetime(2026, 1, 28, 15, 30, tzinfo=UTC)
    assert parse_iso("9999-12-31T23:59:59-23:59") is None
    assert parse_iso("yesterday") is None


def test_is_mine_only_for_my_manual_lock() -> None:
    me = Operator(email="alice@example.com", hostname="elsewhere", pid=1)
    assert is_mine(held(with_pid=False, operation="manual"), me)
    assert not is_mine(held(), me)
    assert not is_mine(held(with_pid=False, operation="manual"), BOB)
    assert not is_mine({"locked": False}, me)


# --- this machine ----------------------------------------------------------------------------


def test_machine_id_falls_back_to_a_private_random_id_kept_in_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lockrules, "MACHINE_ID_FILES", (tmp_path / "no-machine-id",))
    first = read_machine_id(tmp_path)
    path = tmp_path / ".togather" / "machine-id"
    assert first and len(first) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_machine_id(tmp_path) == first


def test_machine_id_prefers_the_os_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os_id = tmp_path / "machine-id"
    os_id.write_text("0123456789ABCDEF0123456789abcdef\n")
    monkeypatch.setattr(lockrules, "MACHINE_ID_FILES", (os_id,))
    assert read_machine_id(tmp_path) == "0123456789abcdef0123456789abcdef"
    assert not (tmp_path / ".togather").exists()


def test_machine_id_is_none_when_home_cannot_keep_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lockrules, "MACHINE_ID_FILES", ())
    (tmp_path / ".togather").write_text("a file, not a directory")
    assert read_machine_id(tmp_path) is None


def test_process_start_time_tells_a_live_process_from_a_gone_one() -> None:
    mine = process_start_time(os.getpid())
    assert mine is not None and mine == process_start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start_time(child.pid) is None


def test_current_operator_records_its_machine_and_start_time() -> None:
    me = Operator.current()
    assert me.machine_id and me.process_started
    lock = new_lock(me, deployment_id=DEPLOYMENT_ID, now=T0, timeout_minutes=30,
                    operation="deploy")
    assert lock["machine_id"] == me.machine_id
    assert lock["process_started"] == process_start_time(os.getpid())
    assert "machine_id" not in new_lock(me, deployment_id=DEPLOYMENT_ID, now=T0,
                                        timeout_minutes=30, operation="manual", with_pid=False)
