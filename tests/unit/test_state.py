"""The state model: transitions, queries, parsing, and compatibility with the original schema."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest

from togather_tasks.errors import StateError
from togather_tasks.lock import Operator, new_lock
from togather_tasks.state import State, history_entry, iso, new_deployment, parse_iso
from togather_tasks.ulid import new_id

T0 = datetime(2026, 1, 28, 10, 30, tzinfo=UTC)
OPERATOR = Operator(email="ops@example.com", hostname="laptop.example.com", pid=4242)


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()[:40]


def deployment(n: int, slot: str = "blue", **fields: Any) -> dict[str, Any]:
    """The n-th deployment (ids increase with n as they do in real life)."""
    d = new_deployment(deployment_id=new_id("dep"), git_commit=sha(n),
                       deployed_by="ops@example.com", slot=slot,
                       image=f"togather-server:{sha(n)[:7]}", at=T0 + timedelta(hours=n))
    d.update(health_status="healthy", duration_seconds=40 + n, migrations_run=n % 3)
    d.update(fields)
    return d


def deploy(state: State, n: int, limit: int = 20) -> tuple[State, dict[str, Any]]:
    d = deployment(n, slot=state.next_slot())
    return state.record_success(d, limit), d


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in entries]


@pytest.fixture
def compat_validator(compat_schema: Callable[[str], dict]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        compat_schema("deployment-state.schema.json"),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def assert_compatible(validator: jsonschema.Draft202012Validator, state: State) -> None:
    document = json.loads(state.to_json())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []


# --- transitions -------------------------------------------------------------------------


def test_empty_state_serialises_and_validates() -> None:
    document = json.loads(State.empty("staging").to_json())
    assert document == {"environment": "staging", "current_deployment": None,
                        "previous_deployment": None, "deployment_history": [],
                        "lock": {"locked": False}}


def test_first_success_becomes_current_without_previous() -> None:
    state, d = deploy(State.empty("staging"), 1)
    assert state.current["id"] == d["id"]
    assert state.current["status"] == "active"
    assert state.previous is None
    assert ids(state.history) == [d["id"]]
    assert state.history[0]["status"] == "active"


def test_second_success_supersedes_the_first() -> None:
    state, first = deploy(State.empty("staging"), 1)
    state, second = deploy(state, 2)
    assert state.current["id"] == second["id"]
    assert state.previous["id"] == first["id"]
    assert state.previous["status"] == "superseded"
    assert ids(state.history) == [second["id"], first["id"]]
    assert [e["status"] for e in state.history] == ["active", "superseded"]


def test_third_success_shifts_previous() -> None:
    state = State.empty("staging")
    deployed = []
    for n in (1, 2, 3):
        state, d = deploy(state, n)
        deployed.append(d)
    assert state.previous["id"] == deployed[1]["id"]
    assert [e["status"] for e in state.history] == ["active", "superseded", "superseded"]


def test_transitions_do_not_modify_the_original_state() -> None:
    before, _ = deploy(State.empty("staging"), 1)
    snapshot = json.loads(before.to_json())
    deploy(before, 2)
    before.record_failure(deployment(3), 20)
    before.with_lock(new_lock(OPERATOR, deployment_id=new_id("dep"), now=T0,
                              timeout_minutes=30, operation="deploy"))
    assert json.loads(before.to_json()) == snapshot


def test_failure_keeps_current_and_adds_a_failed_history_entry() -> None:
    state, good = deploy(State.empty("staging"), 1)
    failed = deployment(2, slot="green", health_status="unhealthy", message="health gate")
    after = state.record_failure(failed, 20)
    assert after.current == state.current
    assert after.previous == state.previous
    assert ids(after.history) == [failed["id"], good["id"]]
    assert after.history[0]["status"] == "failed"
    assert after.history[0]["message"] == "health gate"
    assert after.history[1]["status"] == "active"


def test_failure_on_a_first_deploy_leaves_no_current() -> None:
    state = State.empty("staging").record_failure(deployment(1), 20)
    assert state.current is None
    assert [e["status"] for e in state.history] == ["failed"]
    assert state.next_slot() == "blue"


def test_history_is_truncated_to_the_limit_keeping_the_newest() -> None:
    state = State.empty("staging")
    deployed = []
    for n in range(1, 6):
        state, d = deploy(state, n, limit=3)
        deployed.append(d)
    assert ids(state.history) == [d["id"] for d in reversed(deployed)][:3]


def test_history_entry_keeps_only_history_fields() -> None:
    d = deployment(1, snapshot="/srv/snap.dump", unknown_field="x", message=None)
    entry = history_entry(d)
    assert "unknown_field" not in entry and "message" not in entry
    assert entry["snapshot"] == "/srv/snap.dump"
    assert entry["duration_seconds"] == 41


def rolled_back_state() -> tuple[State, dict, dict]:
    state, first = deploy(State.empty("production"), 1)   # blue
    state, second = deploy(state, 2)                      # green
    at = T0 + timedelta(days=1)
    return state.record_rollback(first, "green", "degraded", at, 20), first, second


def test_rollback_makes_the_target_current_in_its_new_slot() -> None:
    state, first, _ = rolled_back_state()
    assert state.current["id"] == first["id"]
    assert state.current["status"] == "active"
    assert state.current["active_slot"] == "green"
    assert state.current["health_status"] == "degraded"
    assert state.current["rollback_count"] == 1
    assert state.current["rolled_back_at"] == iso(T0 + timedelta(days=1))


def test_rollback_makes_the_rolled_back_deployment_previous() -> None:
    state, _, second = rolled_back_state()
    assert state.previous["id"] == second["id"]
    assert state.previous["status"] == "rolled_back"


def test_rollback_updates_history_statuses() -> None:
    state, first, second = rolled_back_state()
    by_id = {e["id"]: e for e in state.history}
    assert ids(state.history) == [second["id"], first["id"]]
    assert by_id[second["id"]]["status"] == "rolled_back"
    assert by_id[first["id"]]["status"] == "active"
    assert by_id[first["id"]]["active_slot"] == "green"
    assert by_id[first["id"]]["rollback_count"] == 1


def test_rolling_back_twice_to_the_same_deployment_counts_twice() -> None:
    state, first, second = rolled_back_state()
    state = state.record_rollback(state.previous, "blue", "healthy", T0, 20)
    assert state.current["id"] == second["id"]
    state = state.record_rollback(state.previous, "green", "healthy", T0, 20)
    assert state.current["id"] == first["id"]
    assert state.current["rollback_count"] == 2


def test_rollback_to_a_target_no_longer_in_history_adds_it() -> None:
    state, first = deploy(State.empty("staging"), 1)
    state, _ = deploy(state, 2, limit=1)
    assert ids(state.history) != [first["id"]]
    state = state.record_rollback(state.previous, "blue", "healthy", T0, 5)
    assert first["id"] in ids(state.history)
    assert ids(state.history) == sorted(ids(state.history), reverse=True)


def test_rollback_without_a_current_deployment_is_an_error() -> None:
    with pytest.raises(StateError, match="nothing to roll back"):
        State.empty("staging").record_rollback(deployment(1), "blue", "healthy", T0, 20)


# --- queries -----------------------------------------------------------------------------


def test_next_slot_starts_blue_then_alternates() -> None:
    state = State.empty("staging")
    slots = []
    for n in range(1, 5):
        slots.append(state.next_slot())
        state, _ = deploy(state, n)
    assert slots == ["blue", "green", "blue", "green"]
    assert state.active_slot == "green"


def test_failed_deploy_does_not_change_the_next_slot() -> None:
    state, _ = deploy(State.empty("staging"), 1)
    state = state.record_failure(deployment(2, slot="green"), 20)
    assert state.next_slot() == "green"


@pytest.fixture
def populated() -> tuple[State, list[dict[str, Any]]]:
    state = State.empty("staging")
    deployed = []
    for n in (1, 2, 3):
        state, d = deploy(state, n)
        deployed.append(d)
    failed = deployment(4)
    state = state.record_failure(failed, 20)
    return state, [*deployed, failed]


@pytest.mark.parametrize("key", [
    lambda d: d["id"],
    lambda d: d["version"],
    lambda d: d["git_commit"],
    lambda d: d["git_commit"][:12],
], ids=["id", "short sha", "full sha", "sha prefix"])
def test_find_by_id_or_sha(populated, key) -> None:
    state, deployed = populated
    target = deployed[0]
    found = state.find(key(target))
    assert found is not None and found["id"] == target["id"]


def test_find_prefers_current_data_over_history(populated) -> None:
    state, deployed = populated
    assert state.find(deployed[2]["version"]) is state.current


def test_find_ignores_failed_deployments(populated) -> None:
    state, deployed = populated
    failed = deployed[3]
    assert state.find(failed["id"]) is None
    assert state.find(failed["version"]) is None


@pytest.mark.parametrize("query", ["", "abc", "0000000", "dep_"])
def test_find_unknown_query_returns_none(populated, query: str) -> None:
    assert populated[0].find(query) is None


def test_find_needs_at_least_seven_characters_of_a_sha(populated) -> None:
    state, deployed = populated
    assert state.find(deployed[0]["git_commit"][:6]) is None
    assert state.find(deployed[0]["git_commit"][:8])["id"] == deployed[0]["id"]


def test_find_returns_the_newest_of_the_same_commit() -> None:
    state, _ = deploy(State.empty("staging"), 1)
    state, _ = deploy(state, 2)
    redeploy = deployment(1, slot=state.next_slot())
    state = state.record_success(redeploy, 20)
    assert state.find(sha(1)[:7])["id"] == redeploy["id"]


def test_rollback_candidates_exclude_current_and_failed(populated) -> None:
    state, deployed = populated
    assert ids(state.rollback_candidates()) == [deployed[1]["id"], deployed[0]["id"]]


def test_no_rollback_candidates_after_one_deploy() -> None:
    state, _ = deploy(State.empty("staging"), 1)
    assert state.rollback_candidates() == []


# --- parsing ------------------------------------------------------------------------------


def test_round_trip_keeps_everything_including_unknown_fields(populated) -> None:
    state, _ = populated
    document = json.loads(state.to_json())
    document["written_by"] = "old bash tool"
    document["current_deployment"]["custom_note"] = "keep me"
    again = State.from_json(json.dumps(document), "state.json", "staging")
    assert json.loads(again.to_json()) == document


def test_truncated_json_is_a_clear_state_error(populated) -> None:
    text = populated[0].to_json()
    with pytest.raises(StateError) as info:
        State.from_json(text[: len(text) // 2], "/srv/x/deployment-state.json on h", "staging")
    assert "/srv/x/deployment-state.json on h is not valid JSON" in info.value.message
    assert "truncated" in info.value.hint


@pytest.mark.parametrize("text", ["", "   ", "{", "not json"])
def test_non_json_is_a_state_error(text: str) -> None:
    with pytest.raises(StateError, match="not valid JSON"):
        State.from_json(text, "state.json", "staging")


@pytest.mark.parametrize("change, path", [
    (lambda d: d.update(current_deployment="abc"), "current_deployment"),
    (lambda d: d["lock"].update(locked="yes"), "lock.locked"),
    (lambda d: d.update(deployment_history={}), "deployment_history"),
    (lambda d: d["current_deployment"].update(version="ABC1234"), "current_deployment"),
    (lambda d: d["deployment_history"][0].update(status="exploded"),
     "deployment_history.0.status"),
    (lambda d: d.pop("lock"), "(top level)"),
    (lambda d: d.update(environment="Q_A"), "environment"),
], ids=["current not an object", "locked not boolean", "history not a list", "bad version",
        "bad history status", "lock missing", "unknown environment"])
def test_schema_violations_are_state_errors_naming_the_field(populated, change, path) -> None:
    document = json.loads(populated[0].to_json())
    change(document)
    with pytest.raises(StateError) as info:
        State.from_json(json.dumps(document), "state.json", "staging")
    assert "does not match the state schema" in info.value.message
    assert f"{path}:" in info.value.message


@pytest.mark.parametrize("text", ["[]", "null", '"state"', "42"])
def test_json_that_is_not_an_object_is_a_state_error(text: str) -> None:
    with pytest.raises(StateError):
        State.from_json(text, "state.json", "staging")


def test_state_of_another_environment_is_refused() -> None:
    text = State.empty("production").to_json()
    with pytest.raises(StateError) as info:
        State.from_json(text, "state.json", "staging")
    assert "'production'" in info.value.message and "'staging'" in info.value.message


def test_invalid_state_is_refused_before_writing() -> None:
    state, _ = deploy(State.empty("staging"), 1)
    state.current["deployed_by"] = "not an e-mail"
    with pytest.raises(StateError, match="state to be written"):
        state.to_json()


def test_times_are_utc_with_a_z_suffix() -> None:
    local = datetime(2026, 1, 28, 12, 0, 5, tzinfo=UTC).astimezone()
    assert iso(local) == "2026-01-28T12:00:05Z"
    assert parse_iso("2026-01-28T12:00:05Z") == datetime(2026, 1, 28, 12, 0, 5, tzinfo=UTC)


# --- compatibility with the original schema (shared/compat) --------------------------------


def _empty() -> State:
    return State.empty("production")


def _one() -> State:
    return deploy(State.empty("staging"), 1)[0]


def _two() -> State:
    return deploy(_one(), 2)[0]


def _failed() -> State:
    return _two().record_failure(deployment(3, message="health gate failed"), 20)


def _rolled_back() -> State:
    return rolled_back_state()[0]


def _locked() -> State:
    lock = new_lock(OPERATOR, deployment_id=new_id("dep"), now=T0, timeout_minutes=30,
                    operation="deploy", message="routine deploy")
    return _two().with_lock(lock)


def _manual_lock() -> State:
    lock = new_lock(OPERATOR, deployment_id=new_id("dep"), now=T0, timeout_minutes=30,
                    operation="manual", message="maintenance", with_pid=False)
    return State.empty("development").with_lock(lock)


def _released() -> State:
    return _locked().without_lock()


def _truncated() -> State:
    state = State.empty("production")
    for n in range(1, 8):
        state = deploy(state, n, limit=3)[0]
    return state


def _with_snapshot() -> State:
    d = deployment(1, snapshot="/srv/togather/staging/snapshots/x.dump")
    return State.empty("staging").record_success(d, 20)


SCENARIOS = [_empty, _one, _two, _failed, _rolled_back, _locked, _manual_lock, _released,
             _truncated, _with_snapshot]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[f.__name__[1:] for f in SCENARIOS])
def test_written_state_validates_against_the_original_schema(compat_validator, scenario) -> None:
    assert_compatible(compat_validator, scenario())


def test_compat_examples_are_present(compat_schema) -> None:
    assert len(compat_schema("deployment-state.schema.json")["examples"]) == 3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_compat_examples_are_read_and_written_back_unchanged(compat_schema, index: int) -> None:
    example = compat_schema("deployment-state.schema.json")["examples"][index]
    state = State.from_json(json.dumps(example), "example", example["environment"])
    assert json.loads(state.to_json()) == example


def test_compat_example_with_a_lock_reads_the_holder(compat_schema) -> None:
    example = compat_schema("deployment-state.schema.json")["examples"][2]
    state = State.from_json(json.dumps(example), "example", "production")
    assert state.lock["locked"] is True
    assert state.lock["locked_by"] == "ops@example.com"
    assert state.active_slot == "green"
    assert state.next_slot() == "blue"


def test_compat_example_supports_find_and_rollback(compat_schema) -> None:
    example = compat_schema("deployment-state.schema.json")["examples"][0]
    state = State.from_json(json.dumps(example), "example", "production")
    assert state.find("abc5678")["id"] == "dep_01JBQR1KXYZABCDEFGHJKMNPQR"
    assert ids(state.rollback_candidates()) == ["dep_01JBQR1KXYZABCDEFGHJKMNPQR",
                                                "dep_01JBQR0KXYZABCDEFGHJKMNPQR"]


def test_compat_example_is_refused_for_the_wrong_environment(compat_schema) -> None:
    example = compat_schema("deployment-state.schema.json")["examples"][1]
    with pytest.raises(StateError, match="belongs to environment 'staging'"):
        State.from_json(json.dumps(example), "example", "production")
