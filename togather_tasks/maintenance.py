"""Maintenance mode: every host's proxy answers 503 with Retry-After and a page carrying the
operator's message (HTML, or JSON for a client that asks for it), without a reload.

On a host it is files in the proxy's state directory, which nginx tests at request time (see
togather-app.conf): a page directory `pages/<ns>-r<seconds>` (page.html, page.json and
info.json for `status`), and `state/maintenance`, a link to it, made or removed by one
rename(2) or unlink(2). The slot marker is another file, so maintenance and a switch never
touch the same file: both commands are safe while a deploy runs, and need no lock (an operator
can put the page up in front of a deploy that is already running). A deploy or a rollback
keeps the page (it never touches those files) and passes it with the host's verification
token (proxy.verify). Slot health checks go to the slots' ports, not through the proxy.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from typing import Any

from . import commands as cmd
from . import proxy
from .config import Settings
from .errors import HostError, UsageError
from .hosts import Host
from .state import utc_now

DEFAULT_MESSAGE = "We are doing some maintenance and will be back shortly."
MAX_MESSAGE = 2000
DEFAULT_RETRY_AFTER = 300
MAX_RETRY_AFTER = 86400


@dataclass(frozen=True)
class Notice:
    """What the page says: the operator's message (plain text), when to retry, since when."""

    message: str
    retry_after: int
    since: str
    by: str

    @property
    def directory(self) -> str:
        """The page directory's name; nginx reads Retry-After from its `-r<seconds>` end."""
        return f"{time.time_ns()}-r{self.retry_after}"


def notice(message: str | None, retry_after: int | None, by: str) -> Notice:
    """A checked notice: bad input is a usage error, never a broken page."""
    text = DEFAULT_MESSAGE if message is None else message.strip()
    if not text:
        raise UsageError("--message is empty; leave it out for the default message")
    if len(text) > MAX_MESSAGE:
        raise UsageError(f"--message has {len(text)} characters; at most {MAX_MESSAGE}")
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        raise UsageError("--message holds control characters; plain text only")
    seconds = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
    if not 1 <= seconds <= MAX_RETRY_AFTER:
        raise UsageError(f"--retry-after takes seconds from 1 to {MAX_RETRY_AFTER}")
    return Notice(text, seconds, utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"), by)


def page_html(n: Notice) -> str:
    """The HTML page: the message escaped (and non-ASCII as character references, so the
    page means the same whatever charset a client assumes)."""
    message = html.escape(n.message).encode("ascii", "xmlcharrefreplace").decode()
    paragraphs = "".join(f"<p>{line}</p>\n" for line in message.split("\n") if line.strip())
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>Down for maintenance</title>\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<style>body{font-family:sans-serif;max-width:40em;margin:4em auto;"
            "padding:0 1em;color:#222}</style>\n</head>\n<body>\n"
            "<h1>Down for maintenance</h1>\n"
            f"{paragraphs}"
            f"<p><small>Please try again in {n.retry_after} seconds.</small></p>\n"
            "</body>\n</html>\n")


def page_json(n: Notice) -> str:
    return json.dumps({"status": "maintenance", "message": n.message,
                       "retry_after": n.retry_after, "since": n.since},
                      ensure_ascii=True) + "\n"


def info_json(n: Notice) -> str:
    """What `status` shows (read back by `read`)."""
    return json.dumps({"message": n.message, "retry_after": n.retry_after, "since": n.since,
                       "by": n.by}, ensure_ascii=True) + "\n"


def turn_on(settings: Settings, host: Host, n: Notice) -> None:
    """Write the page directory, then link state/maintenance to it in one rename (a page
    already up is replaced the same way), then remove older page directories."""
    layout = cmd.Layout(settings.remote_dir)
    name = n.directory
    directory = f"{layout.maintenance_pages}/{name}"
    host.run(cmd.proxy_directories(layout) + " && " + cmd.make_open_dir(directory),
             timeout=30, what="creating the maintenance page's directory")
    for file_name, text in (("page.html", page_html(n)), ("page.json", page_json(n)),
                            ("info.json", info_json(n))):
        host.write_file(f"{directory}/{file_name}", text.encode(), mode=0o644)
    host.run(cmd.maintenance_on(layout, name), timeout=30,
             what="turning maintenance mode on")
    wait_shown(settings, host, on=True)


def turn_off(settings: Settings, host: Host) -> bool:
    """Remove the link (one unlink), then the pages. False when it was not on."""
    layout = cmd.Layout(settings.remote_dir)
    was_on = read(settings, host) is not None
    host.run(cmd.maintenance_off(layout), timeout=30, what="turning maintenance mode off")
    wait_shown(settings, host, on=False)
    return was_on


# How long maintenance.on/off wait for HAProxy to show the change, and between two looks.
SHOWN_WITHIN = 2.0
SHOWN_PAUSE = 0.02


def wait_shown(settings: Settings, host: Host, *, on: bool) -> None:
    """HAProxy (proxy.engine: haproxy) sees the link change within 20 ms (togather.lua): ask
    through the proxy, as a client does, until it answers 503 (on) or anything else (off), at
    most SHOWN_WITHIN seconds, so the command returns once clients see the change. nginx reads
    the link at each request: nothing to wait for. A proxy that does not answer (not running)
    is not waited for."""
    if cmd.engine_of(settings).file_poll is None:
        return
    deadline = time.monotonic() + SHOWN_WITHIN
    while True:
        try:
            status = proxy.get_through(settings, host, settings.health_endpoint).status
        except (OSError, ConnectionError, HostError):
            return
        if (status == 503) == on or time.monotonic() > deadline:
            return
        time.sleep(SHOWN_PAUSE)


def read(settings: Settings, host: Host) -> dict[str, Any] | None:
    """The host's notice (message, retry_after, since, by), None when maintenance is off."""
    layout = cmd.Layout(settings.remote_dir)
    text = host.run(cmd.read_file(f"{layout.maintenance_link}/info.json"), timeout=30).stdout
    if not text.strip():
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {"message": "(unreadable notice)", "retry_after": None, "since": None,
                "by": None}
    return info if isinstance(info, dict) else None


def describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "off"
    return (f"on since {info.get('since') or '?'} (by {info.get('by') or '?'}, "
            f"Retry-After {info.get('retry_after')}s): {info.get('message')}")
