"""StateStore over LocalHost in a temporary directory: the compare-and-swap, the lock, and
shell quoting of the directory name. Runs `sh`, `flock` and `sha256sum` locally; the host's
clock is faked (`ClockedHost`), since lock times are the host's, never this machine's."""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from togather_tasks import store as store_module
from togather_tasks.errors import ExitCode, LockHeldError, StateError
from togather_tasks.hosts import LocalHost, Result
from togather_tasks.lock import Operator, new_lock, process_start_time
from togather_tasks.state import State, new_deployment, parse_iso, utc_now
from togather_tasks.store import (
    ABSENT,
    CAS_CONFLICT,
    HOST_CLOCK,
    UPLOAD_INCOMPLETE,
    StateConflict,
    StateStore,
    cas_script,
    read_script,
    write_script,
)
from togather_tasks.ulid import new_id

T0 = datetime(2026, 1, 28, 15, 0, tzinfo=UTC)
HOSTNAME = socket.gethostname()


def operator(email: str = "alice@example.com", pid: int | None = None) -> Operator:
    """An operator on one (fake) machine; by default this very process."""
    pid = os.getpid() if pid is None else pid
    return Operator(email=email, hostname=HOSTNAME, pid=pid, machine_id="a" * 32,
                    boot_id="b" * 32, process_started=process_start_time(pid) or "ticks:1")


class ClockedHost(LocalHost):
    """This machine, whose clock reads `now` for the state store (the host's `date`)."""

    def __init__(self, now: datetime = T0) -> None:
        super().__init__()
        self.now = now

    def _run(self, command: str, timeout: float | None) -> Result:
        fake = f"echo {int(self.now.timestamp())}"
        return super()._run(command.replace(HOST_CLOCK, fake), timeout)


def make_store(directory: Path, host: LocalHost | None = None) -> StateStore:
    return StateStore(host or ClockedHost(), str(directory), "staging")


def acquire(store: StateStore, who: Operator | None = None, **kw):
    kw.setdefault("process_alive", lambda _pid: True)
    return store.acquire(who or operator(), deployment_id=new_id("dep"), operation="deploy",
                         timeout_minutes=30, **kw)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "srv" / "staging"


def test_reading_an_absent_file_gives_the_empty_state(state_dir: Path) -> None:
    snap = make_store(state_dir).read()
    assert snap.token == ABSENT
    assert snap.state == State.empty("staging")
    assert not state_dir.exists()


def test_write_creates_the_directory_and_the_file(state_dir: Path) -> None:
    store = make_store(state_dir)
    token = store.write(State.empty("staging"), ABSENT)
    content = (state_dir / "deployment-state.json").read_bytes()
    assert token == hashlib.sha256(content).hexdigest()
    assert store.read().token == token
    assert leftovers(state_dir) == []


def test_write_with_the_current_token_succeeds(state_dir: Path) -> None:
    store = make_store(state_dir)
    store.write(State.empty("staging"), ABSENT)
    snap = store.read()
    locked = snap.state.with_lock({"locked": False, "note": 1})
    new_token = store.write(locked, snap.token)
    assert new_token != snap.token
    assert store.read().state.lock == {"locked": False, "note": 1}


def test_write_with_a_stale_token_conflicts_and_leaves_the_file(state_dir: Path) -> None:
    store = make_store(state_dir)
    store.write(State.empty("staging"), ABSENT)
    stale = store.read().token
    store.write(State.empty("staging").with_lock({"locked": False, "v": 2}), stale)
    before = (state_dir / "deployment-state.json").read_bytes()
    with pytest.raises(StateConflict):
        store.write(State.empty("staging").with_lock({"locked": False, "v": 3}), stale)
    assert (state_dir / "deployment-state.json").read_bytes() == before
    assert leftovers(state_dir) == []


def test_write_expecting_absent_conflicts_when_the_file_exists(state_dir: Path) -> None:
    store = make_store(state_dir)
    store.write(State.empty("staging"), ABSENT)
    with pytest.raises(StateConflict):
        store.write(State.empty("staging"), ABSENT)


def test_written_file_is_not_world_readable(state_dir: Path) -> None:
    make_store(state_dir).write(State.empty("staging"), ABSENT)
    assert (state_dir / "deployment-state.json").stat().st_mode & 0o007 == 0


def test_write_creates_the_directory_and_its_parent_closed_to_others(state_dir: Path) -> None:
    make_store(state_dir).write(State.empty("staging"), ABSENT)
    assert [oct(d.stat().st_mode & 0o777) for d in (state_dir.parent, state_dir)] == [
        "0o750", "0o750"]


def test_an_existing_world_readable_directory_is_closed_by_the_next_write(
        state_dir: Path) -> None:
    state_dir.mkdir(parents=True, mode=0o755)
    state_dir.chmod(0o755)
    make_store(state_dir).write(State.empty("staging"), ABSENT)
    assert state_dir.stat().st_mode & 0o777 == 0o750


def test_update_applies_the_change(state_dir: Path) -> None:
    store = make_store(state_dir)
    store.update(lambda s: s.with_lock({"locked": False, "n": 1}))
    store.update(lambda s: s.with_lock({"locked": False, "n": s.lock["n"] + 1}))
    assert store.read().state.lock["n"] == 2


def test_acquire_writes_the_lock(state_dir: Path) -> None:
    store = make_store(state_dir)
    lock, decision = acquire(store)
    assert decision.acquire and decision.replaced is None
    on_disk = store.read().state.lock
    assert on_disk == lock
    assert on_disk["locked_by"] == "alice@example.com"
    assert on_disk["locked_at"] == "2026-01-28T15:00:00Z"
    assert store.holds(lock["lock_id"])


def test_second_acquire_is_refused_naming_the_holder(state_dir: Path) -> None:
    store = make_store(state_dir)
    acquire(store, operator("alice@example.com"))
    with pytest.raises(LockHeldError) as info:
        acquire(make_store(state_dir), operator("bob@example.com"))
    assert info.value.exit_code == ExitCode.LOCK_HELD == 3
    assert "alice@example.com" in info.value.message
    assert "lock.release" in info.value.hint


def test_acquire_takes_over_an_expired_lock(state_dir: Path) -> None:
    old, _ = acquire(make_store(state_dir), operator("alice@example.com"))
    later = make_store(state_dir, ClockedHost(T0 + timedelta(minutes=31)))
    lock, decision = acquire(later, operator("bob@example.com"))
    assert decision.replaced["lock_id"] == old["lock_id"]
    assert later.read().state.lock["lock_id"] == lock["lock_id"]


def test_acquire_takes_over_a_lock_whose_local_holder_is_gone(state_dir: Path) -> None:
    old, _ = acquire(make_store(state_dir), operator(pid=999_999))
    _, decision = acquire(make_store(state_dir), process_alive=lambda pid: pid != 999_999)
    assert decision.replaced["lock_id"] == old["lock_id"]


def test_force_breaks_a_live_lock(state_dir: Path) -> None:
    old, _ = acquire(make_store(state_dir), operator("alice@example.com"))
    store = make_store(state_dir)
    lock, decision = acquire(store, operator("bob@example.com"), force=True)
    assert decision.replaced["lock_id"] == old["lock_id"]
    assert store.read().state.lock["locked_by"] == "bob@example.com"


def test_release_by_lock_id(state_dir: Path) -> None:
    store = make_store(state_dir)
    lock, _ = acquire(store)
    released = store.release(lock["lock_id"])
    assert released["lock_id"] == lock["lock_id"]
    assert store.read().state.lock == {"locked": False}
    acquire(make_store(state_dir), operator("bob@example.com"))


def test_release_of_someone_elses_lock_without_force_does_nothing(state_dir: Path) -> None:
    store = make_store(state_dir)
    lock, _ = acquire(store)
    assert store.release(new_id("lock")) is None
    assert store.read().state.lock == lock


def test_release_where_frees_the_lock_its_rule_accepts(state_dir: Path) -> None:
    store = make_store(state_dir)
    lock, _ = acquire(store)
    outcome = make_store(state_dir).release_where(lambda _lock: True)
    assert outcome.released and outcome.found == lock and outcome.at == T0
    assert store.read().state.lock == {"locked": False}


def test_release_where_refused_leaves_the_file_untouched(state_dir: Path) -> None:
    store = make_store(state_dir)
    lock, _ = acquire(store)
    before = (state_dir / "deployment-state.json").stat().st_mtime_ns
    outcome = store.release_where(lambda _lock: False)
    assert not outcome.released and outcome.found == lock
    assert (state_dir / "deployment-state.json").stat().st_mtime_ns == before


def test_release_where_judges_the_lock_found_by_the_compare_and_swap(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob takes the lock between our read and our write: the rule is asked again about
    Bob's lock, and Bob's lock stays."""
    mine, _ = acquire(make_store(state_dir), operator(), with_pid=False)
    bobs: list[dict] = []
    real_read = StateStore.read

    def read_then_bob_takes_over(self: StateStore):
        snap = real_read(self)
        if not bobs:
            bobs.append({})
            other = make_store(state_dir)
            other.release(mine["lock_id"])
            bobs[0], _ = acquire(other, operator("bob@example.com"))
        return snap

    monkeypatch.setattr(StateStore, "read", read_then_bob_takes_over)
    asked: list[str] = []

    def only_mine(lock: dict) -> bool:
        asked.append(lock["locked_by"])
        return lock["lock_id"] == mine["lock_id"]

    outcome = make_store(state_dir).release_where(only_mine)
    assert asked == ["alice@example.com", "bob@example.com"]
    assert not outcome.released and outcome.found == bobs[0]
    monkeypatch.undo()
    assert make_store(state_dir).read().state.lock == bobs[0]


def test_release_when_free_returns_none(state_dir: Path) -> None:
    assert make_store(state_dir).release(new_id("lock")) is None


def test_renew_pushes_the_expiry(state_dir: Path) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    lock, _ = acquire(store)
    host.now = T0 + timedelta(minutes=20)
    assert store.renew(lock["lock_id"], 30) is True
    assert parse_iso(store.read().state.lock["lock_expires_at"]) == T0 + timedelta(minutes=50)


def test_renew_of_a_lock_that_is_not_ours_changes_nothing(state_dir: Path) -> None:
    store = make_store(state_dir)
    lock, _ = acquire(store)
    assert store.renew(new_id("lock"), 90) is False
    assert store.read().state.lock == lock


def test_lock_changes_keep_the_deployments(state_dir: Path) -> None:
    store = make_store(state_dir)
    d = new_deployment(deployment_id=new_id("dep"), git_commit="a" * 40,
                       deployed_by="ops@example.com", slot="blue", image="img:aaaaaaa", at=T0)
    store.update(lambda s: s.record_success(d, 20))
    lock, _ = acquire(store)
    store.renew(lock["lock_id"], 30)
    store.release(lock["lock_id"])
    state = store.read().state
    assert state.current["id"] == d["id"]
    assert [e["id"] for e in state.history] == [d["id"]]


@pytest.mark.parametrize("content", [b'{"environment": "staging", "current_deploy', b"",
                                     b"\xff\xfe not text"])
def test_corrupt_state_file_is_an_error_and_is_not_overwritten(state_dir: Path,
                                                               content: bytes) -> None:
    state_dir.mkdir(parents=True)
    path = state_dir / "deployment-state.json"
    path.write_bytes(content)
    store = make_store(state_dir)
    with pytest.raises(StateError):
        store.read()
    with pytest.raises(StateError):
        acquire(store)
    assert path.read_bytes() == content


def test_state_file_of_another_environment_is_refused(state_dir: Path) -> None:
    StateStore(LocalHost(), str(state_dir), "production").write(State.empty("production"),
                                                                ABSENT)
    with pytest.raises(StateError, match="belongs to environment 'production'"):
        make_store(state_dir).read()


def test_concurrent_acquires_let_exactly_one_win(state_dir: Path) -> None:
    contenders = 8
    barrier = threading.Barrier(contenders)
    won: list[str] = []
    refused: list[LockHeldError] = []
    other: list[BaseException] = []

    def contend(i: int) -> None:
        store = make_store(state_dir)
        barrier.wait()
        try:
            lock, _ = acquire(store, operator(f"op{i}@example.com"))
            won.append(lock["locked_by"])
        except LockHeldError as exc:
            refused.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            other.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert other == []
    assert len(won) == 1
    assert len(refused) == contenders - 1
    assert make_store(state_dir).read().state.lock["locked_by"] == won[0]
    assert leftovers(state_dir) == []


# --- shell quoting -------------------------------------------------------------------------

HOSTILE_DIR_NAMES = ["it's a dir", "$(touch pwned) `touch pwned`", 'semi;colon && "dq"',
                     "-rf *?[x] ünïcödé"]


@pytest.mark.parametrize("name", HOSTILE_DIR_NAMES)
def test_hostile_directory_names_work_end_to_end(tmp_path: Path, name: str) -> None:
    directory = tmp_path / name / "state"
    store = make_store(directory)
    lock, _ = acquire(store)
    assert (directory / "deployment-state.json").is_file()
    assert store.read().state.lock["lock_id"] == lock["lock_id"]
    assert store.release(lock["lock_id"])["lock_id"] == lock["lock_id"]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def run_sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=False)


def test_read_script_prints_the_time_and_absent_for_a_missing_file(tmp_path: Path) -> None:
    before = int(time.time())
    result = run_sh(read_script(str(tmp_path), str(tmp_path / "it's missing.json")), tmp_path)
    clock, rest = result.stdout.split("\n", 1)
    assert before <= int(clock) <= time.time()
    assert rest == f"{ABSENT}\n"


def test_read_script_prints_time_hash_marker_and_content(tmp_path: Path) -> None:
    path = tmp_path / "a 'b' $(c).json"
    path.write_text('{"x": 1}\n')
    _clock, token, marker, body = run_sh(read_script(str(tmp_path), str(path)),
                                         tmp_path).stdout.split("\n", 3)
    assert token == hashlib.sha256(b'{"x": 1}\n').hexdigest()
    assert marker == "--togather-state--"
    assert body == '{"x": 1}\n'


def test_cas_script_quotes_every_path() -> None:
    script = cas_script("/srv/it's dir", "/srv/it's dir/state.json", "/srv/it's dir/.t.tmp",
                        ABSENT)
    for value in ("/srv/it's dir", "/srv/it's dir/state.json", "/srv/it's dir/.t.tmp"):
        assert shlex.quote(value) in script


def test_cas_script_replaces_only_when_the_hash_matches(tmp_path: Path) -> None:
    directory = tmp_path / "d 'q'"
    directory.mkdir()
    state_file, tmp = directory / "state.json", directory / ".new.tmp"
    state_file.write_text("old\n")
    tmp.write_text("new\n")
    wrong = run_sh(cas_script(str(directory), str(state_file), str(tmp), "0" * 64), tmp_path)
    assert wrong.returncode == CAS_CONFLICT
    assert state_file.read_text() == "old\n" and not tmp.exists()
    tmp.write_text("new\n")
    right = hashlib.sha256(b"old\n").hexdigest()
    ok = run_sh(cas_script(str(directory), str(state_file), str(tmp), right), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert state_file.read_text() == "new\n" and not tmp.exists()


def test_reads_never_see_a_half_swapped_file_while_another_process_writes(
        state_dir: Path) -> None:
    """A reader racing compare-and-swap writers gets a consistent (hash, content) pair every
    time: the read holds a shared flock the writers' exclusive one excludes."""
    writer_store, reader_store = make_store(state_dir), make_store(state_dir)
    writer_store.write(State.empty("staging"), ABSENT)
    failures: list[BaseException] = []
    stop = threading.Event()

    def write_many() -> None:
        try:
            for i in range(40):
                if stop.is_set():
                    return
                writer_store.update(lambda s, i=i: s.with_lock(
                    {"locked": False, "message": "x" * (i % 7)}))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    writer = threading.Thread(target=write_many)
    writer.start()
    try:
        for _ in range(40):
            reader_store.read()
    finally:
        stop.set()
        writer.join(60)
    assert not failures


# --- the host's clock ------------------------------------------------------------------------


def test_a_fresh_lock_is_judged_by_the_hosts_clock_not_this_machines(state_dir: Path) -> None:
    """This machine's clock runs 31 minutes ahead of the host's: the lock Alice took a minute
    ago (host time) is fresh, and Bob's acquire must say so instead of taking it over."""
    host_now = utc_now() - timedelta(minutes=31)
    alices = new_lock(operator(), deployment_id=new_id("dep"), now=host_now - timedelta(minutes=1),
                      timeout_minutes=30, operation="deploy")
    store = StateStore(ClockedHost(host_now), str(state_dir), "staging")
    store.write(State.empty("staging").with_lock(alices), ABSENT)
    with pytest.raises(LockHeldError) as info:
        acquire(store, operator("bob@example.com"))
    assert "expires in 29m00s" in info.value.message
    assert store.read().state.lock == alices


def test_a_lock_expired_by_the_hosts_clock_is_taken_over_whatever_this_machine_says(
        state_dir: Path) -> None:
    old, _ = acquire(make_store(state_dir), operator("alice@example.com"))
    lock, decision = acquire(make_store(state_dir, ClockedHost(T0 + timedelta(minutes=30))),
                             operator("bob@example.com"))
    assert decision.replaced == old and "expired" in decision.reason
    assert lock["locked_at"] == "2026-01-28T15:30:00Z"


class SilentClockHost(LocalHost):
    def _run(self, command: str, timeout: float | None) -> Result:
        return super()._run(command.replace(HOST_CLOCK, "echo not-a-time"), timeout)


def test_a_host_that_does_not_tell_its_time_is_a_clear_error(state_dir: Path) -> None:
    with pytest.raises(StateError, match="did not tell its time"):
        make_store(state_dir, SilentClockHost()).read()


# --- holder gone: this machine, this boot, pid free or reused ---------------------------------


def test_a_namesake_machines_lock_is_not_taken_over_when_its_pid_is_free_here(
        state_dir: Path) -> None:
    namesake = Operator(email="carol@example.com", hostname=HOSTNAME, pid=999_999,
                        machine_id="c" * 32, boot_id="b" * 32, process_started="ticks:1")
    acquire(make_store(state_dir), namesake)
    with pytest.raises(LockHeldError):
        acquire(make_store(state_dir), process_alive=lambda pid: pid != 999_999)


def test_a_reused_pid_is_taken_over(state_dir: Path) -> None:
    old, _ = acquire(make_store(state_dir), operator(pid=4242))
    _, decision = acquire(make_store(state_dir), start_time=lambda _pid: "ticks:2")
    assert decision.replaced["lock_id"] == old["lock_id"]


# --- round trips: one command per write, decisions on the remembered state ---------------------


def test_write_script_quotes_every_path_and_the_digests() -> None:
    script = write_script("/srv/it's dir", "/srv/it's dir/state.json", "/srv/it's dir/.t.tmp",
                          ABSENT, "f" * 64)
    for value in ("/srv/it's dir", "/srv/it's dir/state.json", "/srv/it's dir/.t.tmp"):
        assert shlex.quote(value) in script
    assert "f" * 64 in script and "set -C" in script


def test_write_script_swaps_in_the_content_from_standard_input(tmp_path: Path) -> None:
    directory = tmp_path / "new 'dir'"
    state_file, tmp = directory / "state.json", directory / ".new.tmp"
    digest = hashlib.sha256(b"new\n").hexdigest()
    done = subprocess.run(["sh", "-c", write_script(str(directory), str(state_file), str(tmp),
                                                    ABSENT, digest)],
                          input=b"new\n", capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert state_file.read_bytes() == b"new\n" and not tmp.exists()
    assert state_file.stat().st_mode & 0o777 == 0o640


def test_an_upload_cut_short_is_never_swapped_in(tmp_path: Path) -> None:
    state_file, tmp = tmp_path / "state.json", tmp_path / ".new.tmp"
    state_file.write_bytes(b"old\n")
    expected = hashlib.sha256(b"old\n").hexdigest()
    digest = hashlib.sha256(b"the whole new content\n").hexdigest()
    cut = subprocess.run(["sh", "-c", write_script(str(tmp_path), str(state_file), str(tmp),
                                                   expected, digest)],
                         input=b"the whole", capture_output=True, timeout=30, check=False)
    assert cut.returncode == UPLOAD_INCOMPLETE
    assert state_file.read_bytes() == b"old\n" and not tmp.exists()


def test_write_script_never_writes_through_an_existing_temporary_file(tmp_path: Path) -> None:
    """`set -C`: a file (or a symlink planted) at the temporary name is not overwritten."""
    target, tmp = tmp_path / "elsewhere", tmp_path / ".new.tmp"
    target.write_bytes(b"precious\n")
    tmp.symlink_to(target)
    digest = hashlib.sha256(b"new\n").hexdigest()
    done = subprocess.run(["sh", "-c", write_script(str(tmp_path), str(tmp_path / "s.json"),
                                                    str(tmp), ABSENT, digest)],
                          input=b"new\n", capture_output=True, timeout=30, check=False)
    assert done.returncode != 0
    assert target.read_bytes() == b"precious\n" and not (tmp_path / "s.json").exists()


def test_a_write_is_one_command(state_dir: Path) -> None:
    host = ClockedHost()
    make_store(state_dir, host).write(State.empty("staging"), ABSENT)
    assert (host.commands_run, host.files_written) == (1, 0)


def test_an_update_after_a_read_decides_on_it_without_reading_again(state_dir: Path) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    store.read()
    before = host.commands_run
    store.update(lambda s: s.with_lock({"locked": False, "n": 1}))
    assert host.commands_run - before == 1
    assert make_store(state_dir).read().state.lock == {"locked": False, "n": 1}


def test_an_update_on_a_remembered_state_changed_since_is_decided_again(
        state_dir: Path) -> None:
    store, other = make_store(state_dir), make_store(state_dir)
    store.update(lambda s: s.with_lock({"locked": False, "n": 1}))
    other.update(lambda s: s.with_lock({"locked": False, "n": s.lock["n"] + 10}))
    seen: list[int] = []

    def add_one(state: State) -> State:
        seen.append(state.lock["n"])
        return state.with_lock({"locked": False, "n": state.lock["n"] + 1})

    store.update(add_one)
    assert seen == [1, 11]  # the remembered state, then the file as it is
    assert make_store(state_dir).read().state.lock["n"] == 12


def test_a_lock_held_in_the_remembered_state_but_released_since_is_taken(
        state_dir: Path) -> None:
    """Deciding on a remembered state never refuses: a refusal is made on a fresh read."""
    alices, _ = acquire(make_store(state_dir), operator("alice@example.com"))
    bob = make_store(state_dir)
    assert bob.read().state.lock == alices
    make_store(state_dir).release(alices["lock_id"])
    lock, decision = acquire(bob, operator("bob@example.com"))
    assert decision.reason == "unlocked"
    assert make_store(state_dir).read().state.lock == lock


def test_a_lock_is_not_taken_on_a_remembered_state_older_than_the_limit(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    store.read()
    host.now = T0 + timedelta(minutes=5)
    monkeypatch.setattr(store_module, "GUESS_LOCK_SECONDS", -1.0)
    lock, _ = acquire(store)
    assert lock["locked_at"] == "2026-01-28T15:05:00Z"  # from a fresh read's host time


def test_a_lock_taken_on_a_recent_remembered_state_is_one_command(state_dir: Path) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    store.read()
    before = host.commands_run
    lock, _ = acquire(store)
    assert host.commands_run - before == 1
    assert store.known().state.lock == lock == make_store(state_dir).read().state.lock


def test_a_release_after_our_own_write_is_one_command(state_dir: Path) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    lock, _ = acquire(store)
    before = host.commands_run
    assert store.release(lock["lock_id"])["lock_id"] == lock["lock_id"]
    assert host.commands_run - before == 1
    assert make_store(state_dir).read().state.lock == {"locked": False}


def test_a_release_by_someone_else_on_a_remembered_state_is_judged_on_the_file(
        state_dir: Path) -> None:
    """Our remembered state says the lock is ours; it was broken and taken since: the release
    is decided on the file and leaves the new holder's lock."""
    store = make_store(state_dir)
    mine, _ = acquire(store)
    bobs, _ = acquire(make_store(state_dir), operator("bob@example.com"), force=True)
    assert store.release(mine["lock_id"]) is None
    assert make_store(state_dir).read().state.lock == bobs


def test_adopt_takes_a_read_run_elsewhere(state_dir: Path) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    lock, _ = acquire(store)
    output = host.run(store.read_command).stdout
    fresh = make_store(state_dir, host)
    before = host.commands_run
    snap = fresh.adopt(output)
    assert snap.state.lock == lock and snap.host_now == T0
    assert host.commands_run == before and fresh.known() == snap


def test_adopt_reads_again_when_the_output_does_not_match_its_hash(state_dir: Path) -> None:
    host = ClockedHost()
    store = make_store(state_dir, host)
    lock, _ = acquire(store)
    output = host.run(store.read_command).stdout.replace('"locked": true', '"locked": false')
    assert make_store(state_dir, host).adopt(output).state.lock == lock


def test_the_same_content_read_again_is_not_parsed_again(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(state_dir)
    lock, _ = acquire(store)
    parsed: list[str] = []
    real = State.from_json

    def counting(text: str, where: str, environment: str) -> State:
        parsed.append(text)
        return real(text, where, environment)

    monkeypatch.setattr(State, "from_json", staticmethod(counting))
    first, second = store.read(), store.read()
    assert len(parsed) == 1 and first.state == second.state
    first.state.lock["locked_by"] = "changed in memory"  # a copy: the next read is the file's
    assert store.read().state.lock == lock
    store.release(lock["lock_id"])  # decided on the remembered state: no parse
    assert store.read().state.lock == {"locked": False} and len(parsed) == 2
