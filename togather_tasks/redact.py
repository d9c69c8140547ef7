"""Redaction: the one function every output path (console, run log, audit line, webhook,
error message) passes text through.

By value: every secret loaded from the environment file, plus the forms it takes on the way
(URL-encoded, the password part of a database URL). By pattern: credentials in URLs,
KEY=/TOKEN=/SECRET=/PASSWORD= assignments and Bearer tokens, for secrets we were never told about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
# Values shorter than this are not redacted by value: masking "1" or "db" everywhere would make
# output unreadable and protect nothing a pattern does not already cover.
MIN_SECRET_LENGTH = 4

# Greedy password up to the last `@` before the host: a raw `@` in a password is common and
# URL parsers (Go's, Python's) split at the last one too.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s:/@]*):"
                              r"(?P<password>[^\s/]*)@(?=[^\s@/]*(?:[/\s?#]|$))")
_VALUE = r"""(?:(?P<quote>["'])(?P<quoted>.*?)(?P=quote)|(?P<bare>[^\s"',;&]+))"""
# Environment-style names (upper case) with = or :, on one line: `JWT_SECRET=x`, `API_KEY: x`.
_ASSIGNMENT = re.compile(
    r"(?P<key>\b[A-Z0-9_]*(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD)[A-Z0-9_]*)"
    r"(?P<sep>[ \t]*[=:][ \t]*)" + _VALUE)
# Query-string, YAML and prose style, any case, whole words: `?password=x`, `token: x`
# (not `secrets:`, a heading).
_PARAMETER = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?token)\b)"
    r"(?P<sep>[ \t]*[=:][ \t]*)" + _VALUE, re.IGNORECASE)
_BEARER = re.compile(r"(?P<prefix>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
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
    quote = match["quote"] or ""
    return f"{match['key']}{match['sep']}{quote}{MASK}{quote}"


def _forms(value: str) -> set[str]:
    """The shapes a secret can take in output: as is, stripped, URL-(un)quoted, and for a URL
    with credentials, its password on its own."""
    forms = {value, value.strip(), quote(value, safe=""), unquote(value)}
    for line in value.splitlines():
        forms.add(line.strip())
    try:
        parts = urlsplit(value)
        if parts.password:
            forms.update({parts.password, unquote(parts.password)})
    except ValueError:
        pass
    return {f for f in forms if f}


def is_secret_key(name: str) -> bool:
    """Whether an env-file variable is treated as secret in `config.show` (all values are
    redacted by value anyway; this decides which are shown as *** outright)."""
    return bool(_SECRET_KEY_NAMES.search(name))
