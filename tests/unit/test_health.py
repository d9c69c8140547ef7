"""Health verdicts (pure) on bodies that follow the original /health contract."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from togather_tasks.health import evaluate, unreachable

SHA40 = "abc1234567890def1234567890abcdef12345678"


def body(status: str = "healthy", version: str = SHA40[:7], **checks: str) -> dict[str, Any]:
    result = {
        "status": status,
        "version": version,
        "timestamp": "2026-01-28T10:32:00Z",
        "checks": {
            "database": {"status": "pass", "message": "PostgreSQL connection successful",
                         "latency": "8ms", "details": {"pool_size": 10}},
            "migrations": {"status": "pass", "message": "Schema version matches",
                           "latency": "5ms"},
            "http_endpoint": {"status": "pass", "message": "HTTP server responding",
                              "latency": "2ms"},
            "job_queue": {"status": "pass", "message": "River queue ok"},
        },
    }
    for name, check_status in checks.items():
        result["checks"][name] = {"status": check_status, "message": f"{name} is {check_status}"}
    return result


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


@pytest.fixture
def contract(compat_schema: Callable[[str], dict]) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(compat_schema("health-check-response.schema.json"),
                                      format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("document", [
    body(), body("degraded", job_queue="warn"), body("unhealthy", database="fail"),
    body(version=SHA40),
], ids=["healthy", "degraded", "unhealthy", "full sha"])
def test_sample_bodies_follow_the_original_contract(contract, document) -> None:
    assert list(contract.iter_errors(document)) == []


def test_compat_example_is_healthy(compat_schema) -> None:
    example = compat_schema("health-check-response.schema.json")["examples"][0]
    verdict = evaluate(200, encode(example))
    assert verdict.status == "healthy"
    assert verdict.version == "abc1234"


def test_healthy_200_is_healthy() -> None:
    verdict = evaluate(200, encode(body()))
    assert verdict.status == "healthy"
    assert verdict.problem == ""
    assert verdict.version == SHA40[:7]
    assert set(verdict.checks) == {"database", "migrations", "http_endpoint", "job_queue"}
    assert verdict.acceptable(require_healthy=True)
    assert verdict.summary() == "healthy (HTTP 200)"


def test_degraded_200_is_acceptable_unless_healthy_is_required() -> None:
    verdict = evaluate(200, encode(body("degraded", job_queue="warn")))
    assert verdict.status == "degraded"
    assert verdict.acceptable(require_healthy=False) is True
    assert verdict.acceptable(require_healthy=True) is False
    assert "job_queue: job_queue is warn" in verdict.summary()


def test_503_unhealthy_is_unhealthy() -> None:
    verdict = evaluate(503, encode(body("unhealthy", database="fail")))
    assert verdict.status == "unhealthy"
    assert not verdict.acceptable(require_healthy=False)
    assert "database: database is fail" in verdict.summary()
    assert "HTTP 503" in verdict.summary()


def test_200_with_status_unhealthy_is_unhealthy() -> None:
    verdict = evaluate(200, encode(body("unhealthy", migrations="fail")))
    assert verdict.status == "unhealthy"
    assert not verdict.acceptable(require_healthy=False)


@pytest.mark.parametrize("http_status", [500, 503, 404, 204])
def test_non_200_with_a_healthy_body_is_unhealthy(http_status: int) -> None:
    verdict = evaluate(http_status, encode(body()))
    assert verdict.status == "unhealthy"
    assert verdict.problem == f"HTTP {http_status} with status healthy"


def test_html_body_is_invalid_with_a_message() -> None:
    html = b"<!DOCTYPE html>\n<html><body><h1>502 Bad Gateway</h1></body></html>"
    verdict = evaluate(502, html)
    assert verdict.status == "invalid"
    assert "not JSON" in verdict.problem
    assert "<!DOCTYPE html>" in verdict.problem
    assert "\n" not in verdict.problem
    assert not verdict.acceptable(require_healthy=False)
    assert verdict.summary() == verdict.problem


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe\x00", b"OK", b'{"status": "healthy"'])
def test_garbage_is_invalid(raw: bytes) -> None:
    verdict = evaluate(200, raw)
    assert verdict.status == "invalid"
    assert verdict.problem.startswith("HTTP 200, body is not JSON")


@pytest.mark.parametrize("field", ["checks", "status", "version", "timestamp"])
def test_missing_top_level_field_is_invalid_naming_it(field: str) -> None:
    document = body()
    del document[field]
    verdict = evaluate(200, encode(document))
    assert verdict.status == "invalid"
    assert f"'{field}' is a required property" in verdict.problem
    assert "health contract" in verdict.problem


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d["checks"].pop("database"), "'database' is a required property"),
    (lambda d: d["checks"]["database"].pop("message"), "checks.database"),
    (lambda d: d["checks"]["migrations"].update(status="ok"), "checks.migrations.status"),
    (lambda d: d["checks"]["http_endpoint"].update(latency="fast"),
     "checks.http_endpoint.latency"),
    (lambda d: d.update(status="fine"), "status"),
    (lambda d: d.update(version="v1.2.3"), "version"),
    (lambda d: d.update(timestamp="yesterday"), "timestamp"),
], ids=["no database check", "check without message", "bad check status", "bad latency",
        "bad status", "bad version", "bad timestamp"])
def test_contract_violations_are_invalid(change, fragment: str) -> None:
    document = copy.deepcopy(body())
    change(document)
    verdict = evaluate(200, encode(document))
    assert verdict.status == "invalid"
    assert fragment in verdict.problem


@pytest.mark.parametrize("raw", [b"[]", b"null", b'"healthy"'])
def test_json_that_is_not_an_object_is_invalid(raw: bytes) -> None:
    assert evaluate(200, raw).status == "invalid"


def test_expected_version_mismatch_is_unhealthy() -> None:
    verdict = evaluate(200, encode(body(version="def5678")), expected_version=SHA40)
    assert verdict.status == "unhealthy"
    assert "def5678" in verdict.problem and SHA40 in verdict.problem
    assert not verdict.acceptable(require_healthy=False)


@pytest.mark.parametrize("running, expected", [
    (SHA40[:7], SHA40),
    (SHA40, SHA40[:7]),
    (SHA40, SHA40),
    (SHA40[:7], SHA40[:7]),
    (SHA40[:12], SHA40[:9]),
])
def test_version_prefix_match_is_accepted(running: str, expected: str) -> None:
    verdict = evaluate(200, encode(body(version=running)), expected_version=expected)
    assert verdict.status == "healthy", verdict.problem


def test_expected_version_too_short_to_compare_is_a_mismatch() -> None:
    verdict = evaluate(200, encode(body(version=SHA40)), expected_version=SHA40[:4])
    assert verdict.status == "unhealthy"


def test_unreachable_verdict() -> None:
    verdict = unreachable("connection refused")
    assert verdict.status == "unreachable"
    assert verdict.http_status is None
    assert not verdict.acceptable(require_healthy=False)
    assert verdict.summary() == "connection refused"
