"""Webhook notifications (optional): a JSON POST per event (started, completed, failed,
rolled_back), redacted, with bounded retries and backoff. A failing webhook never fails an
operation; it is reported as a warning."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import requests

from .config import Settings
from .output import Console
from .redact import Redactor

EVENTS = ("started", "completed", "failed", "rolled_back")
WEBHOOK_ENV_VAR = "TOGATHER_WEBHOOK_URL"


def webhook_url(settings: Settings) -> str | None:
    """The env file may hold the URL (it often embeds a token); deployment.yml otherwise."""
    return settings.secrets.get(WEBHOOK_ENV_VAR) or settings.notifications.get("webhook_url")


def notify(settings: Settings, console: Console, redactor: Redactor, event: str,
           **fields: Any) -> bool:
    url = webhook_url(settings)
    if not url:
        return True
    if event not in EVENTS:
        raise ValueError(f"unknown event {event}")
    payload = redactor.redact_obj({
        "event": event,
        "environment": settings.env,
        "app": settings.app_name,
        "ts": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **fields,
    })
    failure = post_json(url, payload, retries=int(settings.notifications["retries"]),
                        timeout=float(settings.notifications["timeout"]))
    if failure is None:
        return True
    console.warn(f"webhook notification '{event}' failed ({failure}); the operation is not "
                 "affected")
    return False


def post_json(url: str, payload: Any, *, retries: int, timeout: float,
              headers: dict[str, str] | None = None) -> str | None:
    """POST `payload` with bounded retries and backoff (also for Grafana's annotations).
    Returns None once delivered, else why not (never the URL or a header: they may hold a
    token)."""
    last = ""
    for attempt in range(retries + 1):
        try:
            resp = requests.post(url, json=payload, timeout=timeout,
                                 headers={"User-Agent": "togather-tasks", **(headers or {})})
            if resp.status_code < 300:
                return None
            last = f"HTTP {resp.status_code}"
            if 400 <= resp.status_code < 500 and resp.status_code != 429:
                break  # the receiver rejects it; retrying will not help
        except requests.RequestException as exc:
            last = type(exc).__name__
        if attempt < retries:
            time.sleep(min(0.5 * 2 ** attempt, 4.0))
    return last
