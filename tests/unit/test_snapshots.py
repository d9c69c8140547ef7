"""Snapshot listing and retention (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from togather_tasks.snapshots import (
    SnapshotFile,
    list_command,
    parse_listing,
    protected_names,
    to_delete,
)
from togather_tasks.state import State, new_deployment
from togather_tasks.ulid import new_id

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def name_at(days_ago: float, sha: str = "abc1234", env: str = "staging") -> str:
    ts = (NOW - timedelta(days=days_ago)).strftime("%Y%m%dT%H%M%SZ")
    return f"{env}_{ts}_{sha}.dump"


def snaps(*days_ago: float) -> list[SnapshotFile]:
    listing = "".join(f"{name_at(d, f'{i:07x}')} {100 + i}\n" for i, d in enumerate(days_ago))
    return parse_listing(listing)


def names(files: list[SnapshotFile]) -> list[str]:
    return [f.name for f in files]


def test_parse_listing_reads_name_time_sha_and_size() -> None:
    [snap] = parse_listing("staging_20261126T181500Z_abc1234.dump 2048\n")
    assert snap.name == "staging_20261126T181500Z_abc1234.dump"
    assert snap.taken_at == datetime(2026, 11, 26, 18, 15, tzinfo=UTC)
    assert snap.sha7 == "abc1234"
    assert snap.size == 2048


def test_parse_listing_skips_foreign_files() -> None:
    listing = "\n".join([
        "staging_20261126T181500Z_abc1234.dump 10",
        "manual-backup.dump 10",
        "staging_20261126T181500Z_abc1234.dump.partial 10",
        "staging_2026-11-26_abc1234.dump 10",
        "staging_20261126T181500Z_ABC1234.dump 10",
        "Staging_20261126T181500Z_abc1234.dump 10",
        "",
        "   ",
    ])
    assert names(parse_listing(listing)) == ["staging_20261126T181500Z_abc1234.dump"]


def test_parse_listing_sorts_newest_first() -> None:
    listing = "\n".join([
        "staging_20261120T000000Z_aaaaaaa.dump 1",
        "staging_20261126T000000Z_bbbbbbb.dump 1",
        "staging_20261101T235959Z_ccccccc.dump 1",
        "staging_20261126T000001Z_0000000.dump 1",
    ])
    assert [s.sha7 for s in parse_listing(listing)] == ["0000000", "bbbbbbb", "aaaaaaa",
                                                       "ccccccc"]


def test_parse_listing_tolerates_a_missing_size() -> None:
    assert parse_listing("staging_20261126T181500Z_abc1234.dump\n")[0].size == 0


def test_keeps_the_newest_within_the_count() -> None:
    files = snaps(0.1, 1, 2, 3, 4)
    doomed = to_delete(files, now=NOW, keep=3, max_age_days=7, protected=set())
    assert names(doomed) == names(files[3:])


def test_deletes_everything_older_than_the_age_limit() -> None:
    files = snaps(1, 6.9, 7.1, 30)
    doomed = to_delete(files, now=NOW, keep=10, max_age_days=7, protected=set())
    assert names(doomed) == names(files[2:])


def test_nothing_to_delete_within_limits() -> None:
    assert to_delete(snaps(0, 1, 2), now=NOW, keep=3, max_age_days=7, protected=set()) == []


def test_protected_snapshots_are_never_deleted() -> None:
    files = snaps(1, 2, 3, 40, 90)
    protected = {files[3].name, files[4].name}
    doomed = to_delete(files, now=NOW, keep=1, max_age_days=7, protected=protected)
    assert names(doomed) == [files[1].name, files[2].name]
    assert not protected & set(names(doomed))


def test_protected_snapshots_do_not_use_up_the_count() -> None:
    files = snaps(0.5, 1, 2)
    doomed = to_delete(files, now=NOW, keep=1, max_age_days=7, protected={files[0].name})
    assert names(doomed) == [files[2].name]


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_kept_plus_deleted_is_everything(keep: int) -> None:
    files = snaps(0, 1, 2, 3, 8, 9)
    doomed = to_delete(files, now=NOW, keep=keep, max_age_days=7, protected=set())
    kept = [f for f in files if f not in doomed]
    assert len(kept) == min(keep, 4)
    assert all(f.taken_at >= NOW - timedelta(days=7) for f in kept)


def test_protected_names_come_from_current_and_previous() -> None:
    def d(n: int, snapshot: str) -> dict:
        return {**new_deployment(deployment_id=new_id("dep"), git_commit=f"{n}" * 40,
                                 deployed_by="ops@example.com", slot="blue", image="i:x",
                                 at=NOW),
                "health_status": "healthy", "snapshot": snapshot}

    state = State.empty("staging").record_success(d(1, "/srv/s/one.dump"), 20)
    state = state.record_success(d(2, "/srv/s/two.dump"), 20)
    state = state.record_success(d(3, "/srv/s/three.dump"), 20)
    assert protected_names(state, "/srv/s/new.dump", None) == {
        "three.dump", "two.dump", "new.dump"}
    assert protected_names(None) == set()


def test_list_command_quotes_the_directory() -> None:
    assert "'/srv/it'\"'\"'s/snapshots'" in list_command("/srv/it's/snapshots")


def test_a_snapshot_name_taken_this_second_is_retried_under_the_next_seconds_name(
        settings, tmp_path, monkeypatch) -> None:
    """commands.snapshot_command refuses to replace a snapshot of the same name (exit
    SNAPSHOT_NAME_TAKEN): take_snapshot waits for the next second and takes it under that
    name, never over the one a restore may be about to replay."""
    from togather_tasks import commands as cmd
    from togather_tasks import snapshots

    from .fakehost import FakeSession, failed, ok

    session = FakeSession(settings, tmp_path / "state")
    answers = [failed("", status=cmd.SNAPSHOT_NAME_TAKEN), ok("1234\n")]
    session.primary.on("pg_dump", lambda command: answers.pop(0))
    session.primary.on("find ", ok(""))
    clock = iter([datetime(2026, 11, 26, 18, 15, 0, 900000, tzinfo=UTC),
                  datetime(2026, 11, 26, 18, 15, 1, 10000, tzinfo=UTC)])
    monkeypatch.setattr(snapshots, "utc_now", lambda: next(clock, datetime.now(UTC)))
    slept: list[float] = []
    monkeypatch.setattr(snapshots.time, "sleep", slept.append)

    path, size = snapshots.take_snapshot(session, "abc1234", None)

    assert path.endswith("/staging_20261126T181501Z_abc1234.dump") and size == 1234
    assert len(session.primary.ran("pg_dump")) == 2
    assert slept and 0 < slept[0] <= 0.2
