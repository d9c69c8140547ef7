"""Verdicts on the application's /health answer (SPEC section 6), pure: given the HTTP status
and body, is this deployment healthy, and what does the operator need to read?

Two modes (config `app.health.mode`): `contract`, Togather's JSON body with its checks; and
`http`, for any app: a 2xx from the health endpoint is healthy, and the running version, when
the app has a version endpoint, is read from there."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).parent / "schemas" / "health-response.schema.json"
# GET a path of the app (the health or the version endpoint): (HTTP status, body). Raises what
# the caller's transport raises; the caller turns that into `unreachable`.
Fetch = Callable[[str], tuple[int, bytes]]


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        json.loads(SCHEMA_PATH.read_text()),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@dataclass
class Verdict:
    """`status` is healthy/degraded/unhealthy from the app, or `invalid` when the answer does
    not follow the contract (HTML, garbage, missing fields), or `unreachable`."""

    status: str
    http_status: int | None
    problem: str = ""
    version: str | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    body: dict[str, Any] | None = None

    def acceptable(self, *, require_healthy: bool) -> bool:
        if self.status == "healthy":
            return True
        return self.status == "degraded" and not require_healthy

    def summary(self) -> str:
        if self.problem:
            return self.problem
        failing = [f"{name}: {c.get('message', '')}" for name, c in self.checks.items()
                   if c.get("status") != "pass"]
        text = f"{self.status} (HTTP {self.http_status})"
        return text + ("; " + "; ".join(failing) if failing else "")


def evaluate(http_status: int, body: bytes, *, expected_version: str | None = None) -> Verdict:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        snippet = body[:60].decode("utf-8", "replace").replace("\n", " ")
        return Verdict("invalid", http_status,
                       f"HTTP {http_status}, body is not JSON (starts with {snippet!r})")
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "body"
        return Verdict("invalid", http_status,
                       f"HTTP {http_status}, body does not follow the health contract: "
                       f"{where}: {first.message}", body=document if isinstance(document, dict)
                       else None)
    verdict = Verdict(document["status"], http_status, version=document["version"],
                      checks=document["checks"], body=document)
    if document["status"] == "unhealthy" or http_status not in (200,):
        if document["status"] != "unhealthy":
            verdict.problem = f"HTTP {http_status} with status {document['status']}"
        verdict.status = "unhealthy"
    if expected_version and not _same_version(document["version"], expected_version):
        verdict.problem = (f"running version {document['version']} is not the expected "
                           f"{expected_version}")
        verdict.status = "unhealthy"
    return verdict


def judge(fetch: Fetch, *, mode: str, health_endpoint: str, version_endpoint: str | None,
          expected_version: str | None = None) -> Verdict:
    """The verdict on one instance of the app in the configured health mode."""
    status, body = fetch(health_endpoint)
    if mode == "contract":
        return evaluate(status, body, expected_version=expected_version)
    verdict = evaluate_http(status)
    if verdict.status != "healthy" or not expected_version or not version_endpoint:
        return verdict
    version_status, version_body = fetch(version_endpoint)
    return with_version(verdict, version_status, version_body, expected_version)


def evaluate_http(http_status: int) -> Verdict:
    """Mode `http`: the status code alone decides; the body is the app's own business."""
    if 200 <= http_status < 300:
        return Verdict("healthy", http_status)
    return Verdict("unhealthy", http_status, f"HTTP {http_status} from the health endpoint "
                                             "(health mode http: any 2xx is healthy)")


def running_version(body: bytes) -> str | None:
    """The version a version endpoint reports: `{"version": ...}` (Togather's /version) or
    the whole body as plain text (`abc1234`)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, dict):
        return str(document["version"]) if document.get("version") is not None else None
    # Plain text, also when it happens to parse as JSON: `1234567` or `12e4567` is a SHA.
    return text.split()[0] if text and not text.startswith(("[", "{")) else None


def with_version(verdict: Verdict, http_status: int, body: bytes, expected: str) -> Verdict:
    """A healthy http-mode verdict, checked against what the version endpoint says."""
    version = running_version(body) if 200 <= http_status < 300 else None
    if version is None:
        return Verdict("unhealthy", verdict.http_status,
                       f"the version endpoint answered HTTP {http_status} without a version")
    if not _same_version(version, expected):
        return Verdict("unhealthy", verdict.http_status,
                       f"running version {version} is not the expected {expected}",
                       version=version)
    return Verdict("healthy", verdict.http_status, version=version)


def _same_version(running: str, expected: str) -> bool:
    n = min(len(running), len(expected))
    return n >= 7 and running[:n] == expected[:n]


def unreachable(reason: str) -> Verdict:
    return Verdict("unreachable", None, reason)
