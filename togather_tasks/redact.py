"""Redaction: the one function every output path (console, run log, audit line, webhook,
error message) passes text through.

By value: every secret loaded from the environment file, plus the forms it takes on the way
(URL-encoded, the password part of a database URL). By pattern: credentials in URLs,
KEY=/TOKEN=/SECRET=/PASSWORD= assignments and Bearer tokens, for secrets we were never told about.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

MASK = "***"
# Values shorter than this are not redacted by value: masking "1" or "db" everywhere would make
# output unreadable and protect nothing a pattern does not already cover.
MIN_SECRET_LENGTH = 4

# Every pattern below is linear in the length of a line (a 100 KB line of build output must not
# stall a run): a match may only start where a run of its characters starts (a lookbehind, or a
# lookahead that stays inside one word), and a quoted value ends at its closing quote, at the end
# of the line or after QUOTED_MAX characters, so a failed attempt never rescans the rest.
QUOTED_MAX = 4096
# Greedy password up to the last `@` before the host: a raw `@` in a password is common and
# URL parsers (Go's, Python's) split at the last one too.
_URL_CREDENTIALS = re.compile(r"(?<![a-zA-Z0-9+.-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)"
                              r"(?P<user>[^\s:/@]*):"
                              r"(?P<password>[^\s/]*)@(?=[^\s@/]*(?:[/\s?#]|$))")
_VALUE = (r"""(?:(?P<quote>["'])(?P<quoted>(?:(?!(?P=quote))[^\n]){0,""" + str(QUOTED_MAX)
          + r"""})(?P<close>(?P=quote))?|(?P<bare>[^\s"',;&]+))""")
_SECRET_WORDS = r"(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD)"  # noqa: S105 - a pattern
# Environment-style names (upper case) with = or :, on one line: `JWT_SECRET=x`, `API_KEY: x`.
# The lookahead checks the word holds a secret word without the quadratic backtracking of
# `[A-Z0-9_]*KEY[A-Z0-9_]*`.
_ASSIGNMENT = re.compile(
    r"\b(?=[A-Z0-9_]*?" + _SECRET_WORDS + r")(?P<key>[A-Z0-9_]+)"
    r"(?P<sep>[ \t]*[=:][ \t]*)" + _VALUE)
# Query-string, YAML and prose style, any case, whole words: `?password=x`, `token: x`
# (not `secrets:`, a heading).
_PARAMETER = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?token)\b)"
    r"(?P<sep>[ \t]*[=:][ \t]*)" + _VALUE, re.IGNORECASE)
_BEARER = re.compile(r"(?P<prefix>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_SECRET_KEY_NAMES = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD|URL|DSN)", re.IGNORECASE)


class Redactor:
    """Masks known secret values and secret-looking patterns in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        for value in secrets:
            for form in _forms(value):
                if len(form) >= MIN_SECRET_LENGTH:
                    self._values.add(form)
        # Longest first so a secret containing another is masked whole.
        self._ordered = sorted(self._values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for value in self._ordered:
            if value in text:
                text = text.replace(value, MASK)
        text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _ASSIGNMENT.sub(_mask_assignment, text)
        text = _PARAMETER.sub(_mask_assignment, text)
        text = _BEARER.sub(lambda m: f"{m['prefix']}{MASK}", text)
        return text

    def redact_obj(self, obj: object) -> object:
        """Redact every string inside a JSON-like structure (dicts, lists)."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {k: self.redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.redact_obj(v) for v in obj]
        return obj


def _mask_assignment(match: re.Match[str]) -> str:
    value = match["quoted"] if match["quote"] else match["bare"]
    if value == MASK or not value:
        return match.group(0)
    opening = match["quote"] or ""
    closing = match["close"] or ""
    return f"{match['key']}{match['sep']}{opening}{MASK}{closing}"


def _forms(value: str) -> set[str]:
    """The shapes a secret can take in output: as is, stripped, escaped, URL-(un)quoted (with
    `/` kept or not, `+` for spaces, upper- or lower-case %xx: every encoder differs), and for a
    URL with credentials, its password on its own."""
    encoded = {quote(value, safe=""), quote(value), quote_plus(value, safe=""), quote_plus(value)}
    encoded |= {_lower_escapes(e) for e in encoded}
    # Escaped as repr() and json.dumps() write it (a KeyError's message is a repr).
    escaped = {json.dumps(value)[1:-1], repr(value)[1:-1]}
    forms = {value, value.strip(), unquote(value), unquote_plus(value), *encoded, *escaped}
    for line in value.splitlines():
        forms.add(line.strip())
    try:
        parts = urlsplit(value)
        if parts.password:
            forms.update({parts.password, unquote(parts.password)})
    except ValueError:
        pass
    return {f for f in forms if f}


def _lower_escapes(text: str) -> str:
    return _ESCAPE.sub(lambda m: m.group(0).lower(), text)


def is_secret_key(name: str) -> bool:
    """Whether an env-file variable is treated as secret in `config.show` (all values are
    redacted by value anyway; this decides which are shown as *** outright)."""
    return bool(_SECRET_KEY_NAMES.search(name))
