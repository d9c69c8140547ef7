"""Monitoring (optional): each deploy, rollback and failure as Prometheus metrics in node
exporter's textfile collector format, and as a Grafana annotation. Like the webhook, neither
ever fails an operation: a problem is a warning.

The metrics file (`togather_<app>_<env>.prom` in `monitoring.textfile_dir`) is written on every
host of the environment: node exporter runs on each host, and whichever one Prometheus scrapes
(or alerts on) shows the environment's deploys. Its content is the same everywhere; the
counters continue from the primary host's copy (the host that also keeps the state and the
lock), so a host added later picks them up on its first write.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import commands as cmd
from .config import GRAFANA_TOKEN, Settings
from .errors import TogatherError
from .notify import EVENTS, post_json
from .output import Console
from .redact import Redactor
from .session import Session

# node exporter runs as its own user: it must be able to read the file.
TEXTFILE_MODE = 0o644
READ_TIMEOUT = 30
# The events that end an operation get an annotation; `started` would only double each one.
ANNOTATED_EVENTS = ("completed", "failed", "rolled_back")
ANNOTATIONS_PATH = "/api/annotations"
VERSION_INFO = "togather_deployed_version_info"


@dataclass(frozen=True)
class Metrics:
    """What the file says about one environment (None: not known yet, the line is left out).
    Numbers are floats, as Prometheus has them; whole ones are written without a fraction."""

    last_timestamp: float | None = None
    last_duration: float | None = None
    last_success: float | None = None
    rollbacks_total: float = 0
    failures_total: float = 0
    lock_held: float = 0
    version: str | None = None


# name -> (Metrics field, type, help), in the file's order.
SERIES: dict[str, tuple[str, str, str]] = {
    "togather_deploy_last_timestamp_seconds": (
        "last_timestamp", "gauge",
        "When the last deploy or rollback ended (Unix time), whatever its result."),
    "togather_deploy_last_duration_seconds": (
        "last_duration", "gauge", "How long the last deploy or rollback took."),
    "togather_deploy_last_success": (
        "last_success", "gauge", "1 if the last deploy or rollback succeeded, 0 if it failed."),
    "togather_rollbacks_total": ("rollbacks_total", "counter", "Successful rollbacks."),
    "togather_deploy_failures_total": (
        "failures_total", "counter", "Failed deploys and rollbacks."),
    "togather_lock_held": (
        "lock_held", "gauge",
        "1 while a deploy or rollback holds the environment's lock (from its start to its "
        "end; it stays 1 after a run killed outright, whose lock is still held)."),
}
_SAMPLE = re.compile(r"^(?P<name>togather_\w+)\{(?P<labels>.*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_ESCAPED = re.compile(r"\\(.)")


def after_event(previous: Metrics, event: str, *, now: float, duration: float,
                version: str | None) -> Metrics:
    """The metrics once `event` happened. A failure leaves the version as it was: the
    failure path puts traffic back on it."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event}")
    if event == "started":
        return replace(previous, lock_held=1)
    ended = replace(previous, lock_held=0, last_timestamp=now, last_duration=duration)
    if event == "failed":
        return replace(ended, last_success=0, failures_total=previous.failures_total + 1)
    return replace(ended, last_success=1, version=version or previous.version,
                   rollbacks_total=previous.rollbacks_total + (event == "rolled_back"))


def render(app: str, environment: str, metrics: Metrics) -> str:
    """The textfile, in the Prometheus text exposition format."""
    labels = f'app="{label_value(app)}",environment="{label_value(environment)}"'
    lines = []
    for name, (attribute, kind, help_text) in SERIES.items():
        value = getattr(metrics, attribute)
        if value is not None:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{name}{{{labels}}} {_number(value)}"]
    if metrics.version is not None:
        lines += [f"# HELP {VERSION_INFO} The version serving traffic, as label `version`.",
                  f"# TYPE {VERSION_INFO} gauge",
                  f'{VERSION_INFO}{{{labels},version="{label_value(metrics.version)}"}} 1']
    return "\n".join(lines) + "\n"


def label_value(value: str) -> str:
    """Escaped as the exposition format wants: backslash, double quote and line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse(text: str) -> Metrics:
    """The metrics of a file written by `render`; what cannot be read is left out (the
    counters start again from 0, which Prometheus reads as a counter reset)."""
    values: dict[str, Any] = {}
    by_name = {name: attribute for name, (attribute, _, _) in SERIES.items()}
    for line in text.splitlines():
        sample = _SAMPLE.match(line)
        if not sample:
            continue
        if sample["name"] == VERSION_INFO:
            values["version"] = _labels(sample["labels"]).get("version")
        elif sample["name"] in by_name:
            values[by_name[sample["name"]]] = _value(sample["value"])
    return Metrics(**{k: v for k, v in values.items() if v is not None})


def _labels(text: str) -> dict[str, str]:
    return {key: _ESCAPED.sub(_unescape, value) for key, value in _LABEL.findall(text)}


def _unescape(match: re.Match[str]) -> str:
    return "\n" if match[1] == "n" else match[1]


def _value(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def textfile_path(settings: Settings) -> str | None:
    """None when monitoring.textfile_dir is not set (the default). A relative directory is
    inside the environment's remote directory."""
    directory = settings.monitoring.get("textfile_dir")
    if not directory:
        return None
    return posixpath.join(settings.remote_dir, directory,
                          f"togather_{settings.app_name}_{settings.env}.prom")


def annotation(settings: Settings, event: str, *, operation: str, version: str | None,
               by: str, duration_seconds: float, step: str | None, now: float
               ) -> dict[str, Any]:
    """Grafana's POST /api/annotations body: a region from the operation's start to its end,
    without a dashboard (an organisation-wide annotation any dashboard can show by tag)."""
    result = f"failed at {step}" if event == "failed" else "succeeded"
    return {
        "time": int((now - duration_seconds) * 1000),
        "timeEnd": int(now * 1000),
        "tags": ["togather", f"app:{settings.app_name}", f"environment:{settings.env}",
                 f"event:{event}"],
        "text": f"{settings.app_name} {settings.env}: {operation} {version or '?'} by {by}: "
                f"{result}",
    }


def record(session: Session, event: str, *, operation: str, by: str,
           duration_seconds: float, version: str | None = None, step: str | None = None,
           **_webhook_fields: object) -> None:
    """Export `event` of a deploy or rollback; never raises (a warning says what failed).
    Takes the webhook's fields as they are; those it does not export (ids, slot, message)
    are ignored."""
    now = time.time()
    path = textfile_path(session.settings)
    if path:
        _guarded(session, "write the metrics file", lambda: write_textfile(
            session, path, event, now=now, duration=duration_seconds, version=version))
    if session.settings.monitoring.get("grafana_url") and event in ANNOTATED_EVENTS:
        body = annotation(session.settings, event, operation=operation, version=version,
                          by=by, duration_seconds=duration_seconds, step=step, now=now)
        _guarded(session, "send the Grafana annotation",
                 lambda: annotate(session.settings, session.console, session.redact, event,
                                  body))


def _guarded(session: Session, what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - monitoring never fails an operation
        session.console.warn(f"could not {what} ({type(exc).__name__}: {exc}); the operation "
                             "is not affected")


def write_textfile(session: Session, path: str, event: str, *, now: float, duration: float,
                   version: str | None) -> None:
    previous = session.primary.run(cmd.read_if_exists_command(path), timeout=READ_TIMEOUT,
                                   what="reading the metrics file")
    metrics = after_event(parse(previous.stdout), event, now=now, duration=duration,
                          version=version)
    data = render(session.settings.app_name, session.settings.env, metrics).encode()
    for host in session.all_hosts:
        try:
            host.run(cmd.make_dirs(posixpath.dirname(path)),
                     timeout=READ_TIMEOUT, what="creating the metrics directory")
            host.write_file(path, data, mode=TEXTFILE_MODE)
        except (TogatherError, OSError) as exc:
            session.console.warn(f"could not write the metrics file {path} on {host.name} "
                                 f"({exc}); the operation is not affected")


def annotate(settings: Settings, console: Console, redactor: Redactor, event: str,
             body: dict[str, Any]) -> bool:
    """POST the annotation with the token in the Authorization header (never in the URL,
    never in a message); bounded retries like the webhook's."""
    url = settings.monitoring["grafana_url"].rstrip("/") + ANNOTATIONS_PATH
    failure = post_json(url, redactor.redact_obj(body),
                        retries=int(settings.notifications["retries"]),
                        timeout=float(settings.notifications["timeout"]),
                        headers={"Authorization": f"Bearer {settings.secrets[GRAFANA_TOKEN]}"})
    if failure is not None:
        console.warn(f"Grafana annotation '{event}' failed ({failure}); the operation is not "
                     "affected")
    return failure is None
