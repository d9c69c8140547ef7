"""Maintenance mode's files: the notice checked, the message escaped for HTML and JSON, the
page directory named for nginx's Retry-After, and the files written before the one rename that
puts the page up."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from togather_tasks import commands as cmd
from togather_tasks import maintenance
from togather_tasks.config import Settings
from togather_tasks.errors import UsageError
from togather_tasks.hosts import HttpResponse

from .fakehost import FakeHost


def with_haproxy(settings: Settings) -> Settings:
    return dataclasses.replace(settings, proxy={**settings.proxy, "engine": "haproxy"})


HOSTILE = 'Back at 5 <script>alert("x")</script> & "quotes" \\ été'


def test_the_message_is_escaped_for_html() -> None:
    page = maintenance.page_html(maintenance.notice(HOSTILE, 90, "ops@example.com"))
    assert "<script>" not in page
    assert ("Back at 5 &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; "
            "&quot;quotes&quot; \\ &#233;t&#233;") in page
    assert page.isascii()
    assert "try again in 90 seconds" in page


def test_the_message_is_escaped_for_json() -> None:
    n = maintenance.notice(HOSTILE, 90, "ops@example.com")
    text = maintenance.page_json(n)
    assert text.isascii()
    assert json.loads(text) == {"status": "maintenance", "message": HOSTILE, "retry_after": 90,
                                "since": n.since}


def test_a_multi_line_message_is_one_paragraph_per_line() -> None:
    page = maintenance.page_html(maintenance.notice("one\n\ntwo", None, "ops"))
    assert "<p>one</p>\n<p>two</p>\n" in page


@pytest.mark.parametrize(("message", "retry_after", "problem"), [
    ("   ", None, "--message is empty"),
    ("x" * 2001, None, "at most 2000"),
    ("bell\x07", None, "control characters"),
    ("ok", 0, "--retry-after takes seconds from 1 to 86400"),
    ("ok", 86401, "--retry-after takes seconds from 1 to 86400"),
])
def test_bad_input_is_a_usage_error(message: str, retry_after: int | None,
                                    problem: str) -> None:
    with pytest.raises(UsageError, match=re.escape(problem)):
        maintenance.notice(message, retry_after, "ops")


def test_defaults() -> None:
    n = maintenance.notice(None, None, "ops")
    assert (n.message, n.retry_after) == (maintenance.DEFAULT_MESSAGE, 300)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", n.since)


def test_the_page_directory_ends_with_the_retry_after_nginx_reads() -> None:
    """nginx.conf's map: `~-r(?<togather_seconds>[0-9]+)$`."""
    name = maintenance.notice("x", 45, "ops").directory
    assert re.fullmatch(r"[0-9]+-r45", name)


def test_turn_on_writes_the_pages_before_the_link_and_status_reads_them_back(
        settings: Settings) -> None:
    host = FakeHost()
    n = maintenance.notice("Back soon", 60, "ops@example.com")

    maintenance.turn_on(settings, host, n)

    layout = cmd.Layout(settings.remote_dir)
    written = [c for h, c in host.journal if c.startswith("write ")]
    linked = next(i for i, (_, c) in enumerate(host.journal) if "ln -sfn pages/" in c)
    assert [i for i, (_, c) in enumerate(host.journal) if c.startswith("write ")][-1] < linked
    assert {w.rsplit("/", 1)[1] for w in written} == {"page.html", "page.json", "info.json"}
    [page_dir] = {w.split(" ", 1)[1].rsplit("/", 1)[0] for w in written}
    assert page_dir.startswith(f"{layout.maintenance_pages}/") and page_dir.endswith("-r60")
    # status reads info.json through the link; here the link is the directory itself.
    host.files[f"{layout.maintenance_link}/info.json"] = host.files[f"{page_dir}/info.json"]
    assert maintenance.read(settings, host) == {
        "message": "Back soon", "retry_after": 60, "since": n.since, "by": "ops@example.com"}
    assert maintenance.describe(maintenance.read(settings, host)).startswith(
        f"on since {n.since} (by ops@example.com, Retry-After 60s): Back soon")
    assert maintenance.describe(None) == "off"


def test_turn_off_says_whether_it_was_on(settings: Settings) -> None:
    host = FakeHost()
    assert maintenance.turn_off(settings, host) is False
    assert host.ran(cmd.maintenance_off(cmd.Layout(settings.remote_dir)))


def test_with_haproxy_on_and_off_wait_until_the_proxy_shows_it(settings: Settings) -> None:
    """togather.lua sees the link within 20 ms: the command returns once the proxy answers
    503 (on) or something else (off), asked as a client would; nginx is not asked at all."""
    hap = with_haproxy(settings)
    host = FakeHost()
    answers = iter([200, 200, 503, 503, 503, 200])
    asked: list[str] = []

    def http(address: str, port: int, path: str, timeout: float) -> HttpResponse:
        asked.append(path)
        return HttpResponse(next(answers), {}, b"")

    host.http = http
    maintenance.turn_on(hap, host, maintenance.notice("Back soon", 60, "ops"))
    assert len(asked) == 3  # 200, 200, then the page
    maintenance.turn_off(hap, host)
    assert len(asked) == 6  # 503, 503, then the app
    assert set(asked) == {hap.health_endpoint}
    maintenance.turn_on(settings, host, maintenance.notice("Back soon", 60, "ops"))
    assert len(asked) == 6  # nginx: no request


def test_a_proxy_that_does_not_answer_is_not_waited_for(settings: Settings) -> None:
    hap = with_haproxy(settings)
    host = FakeHost()  # refuses every request
    maintenance.turn_on(hap, host, maintenance.notice("Back soon", 60, "ops"))
    assert host.ran("ln -sfn pages/")
