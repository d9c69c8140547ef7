"""ULIDs: shape, Crockford alphabet, time prefix, monotonicity."""

from __future__ import annotations

import re

import pytest

from togather_tasks import ulid

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in milliseconds


@pytest.fixture(autouse=True)
def fresh_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from a generator that has produced nothing yet (restored afterwards)."""
    monkeypatch.setattr(ulid, "_last", (0, 0))


def test_ulid_is_26_crockford_characters() -> None:
    value = ulid.new_ulid()
    assert len(value) == 26
    assert set(value) <= CROCKFORD
    assert ulid.ULID_RE.match(value)


@pytest.mark.parametrize("excluded", ["I", "L", "O", "U"])
def test_alphabet_excludes_ambiguous_letters(excluded: str) -> None:
    assert excluded not in ulid.ALPHABET
    assert not ulid.ULID_RE.match(excluded * 26)


def test_time_prefix_decodes_back() -> None:
    assert ulid.decode_time_ms(ulid.new_ulid(now_ms=T0)) == T0


def test_same_millisecond_ids_increase() -> None:
    first = ulid.new_ulid(now_ms=T0)
    second = ulid.new_ulid(now_ms=T0)
    assert second > first
    assert ulid.decode_time_ms(second) == T0


def test_many_ids_in_one_millisecond_are_strictly_increasing() -> None:
    ids = [ulid.new_ulid(now_ms=T0) for _ in range(200)]
    assert ids == sorted(set(ids))


def test_later_millisecond_sorts_after() -> None:
    early = ulid.new_ulid(now_ms=T0)
    late = ulid.new_ulid(now_ms=T0 + 1)
    assert late > early
    assert ulid.decode_time_ms(late) == T0 + 1


def test_clock_going_backwards_still_increases() -> None:
    later = ulid.new_ulid(now_ms=T0 + 5_000)
    earlier_clock = ulid.new_ulid(now_ms=T0)
    assert earlier_clock > later


def test_random_part_overflow_moves_to_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ulid, "_last", (T0, (1 << 80) - 1))
    value = ulid.new_ulid(now_ms=T0)
    assert ulid.decode_time_ms(value) == T0 + 1
    assert ulid.ULID_RE.match(value)


def test_encode_rejects_values_too_large() -> None:
    with pytest.raises(ValueError):
        ulid.encode(1 << 50, 10)


@pytest.mark.parametrize("prefix", ["dep", "lock"])
def test_new_id_has_prefix_and_ulid(prefix: str) -> None:
    assert re.fullmatch(rf"{prefix}_[0-9A-HJKMNP-TV-Z]{{26}}", ulid.new_id(prefix))


def test_new_id_matches_state_schema_pattern() -> None:
    assert re.match(r"^dep_[0-9A-HJKMNP-TV-Z]{26}$", ulid.new_id("dep"))
