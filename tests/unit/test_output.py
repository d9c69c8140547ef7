"""The console shows values read from the host as data: no terminal control sequences."""

from __future__ import annotations

import io

import pytest

from togather_tasks.output import Console
from togather_tasks.redact import Redactor

HOSTILE = [
    "\x1b[2J\x1b[Hscreen cleared",           # erase the screen, cursor home
    "\x1b]0;pwned\x07title",                 # set the window title
    "fake\rdeployed OK",                     # overwrite the line
    "\x1b[1A\x1b[2Kline above erased",        # cursor up, erase line
    "bell\x07 backspace\x08 nul\x00 c1\x9b31m",
]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("method", ["print", "always", "warn", "note", "error"])
def test_console_strips_control_sequences(value: str, method: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    getattr(Console(Redactor(), stream=out, err=err), method)(f"message: {value}")
    text = out.getvalue() + err.getvalue()
    assert not any(ch in text for ch in "\x1b\r\x07\x08\x00\x9b")
    assert text.endswith("\n") and text.count("\n") == 1


def test_console_keeps_newlines_tabs_and_unicode() -> None:
    out = io.StringIO()
    Console(Redactor(), stream=out).print("a\tb\nc ✓ é")
    assert out.getvalue() == "a\tb\nc ✓ é\n"


def test_a_secret_split_by_an_escape_sequence_is_still_masked() -> None:
    out = io.StringIO()
    Console(Redactor(["long-secret-value"]), stream=out).print("x long-\x1b[0msecret-value")
    assert "secret" not in out.getvalue()
