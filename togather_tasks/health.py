"""Verdicts on the application's /health answer (SPEC section 6), pure: given the HTTP status
and body, is this deployment healthy, and what does the operator need to read?"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).parent / "schemas" / "health-response.schema.json"


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


def _same_version(running: str, expected: str) -> bool:
    n = min(len(running), len(expected))
    return n >= 7 and running[:n] == expected[:n]


def unreachable(reason: str) -> Verdict:
    return Verdict("unreachable", None, reason)
