"""Redaction by value and by pattern, with hostile secrets."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from togather_tasks.redact import MASK, MIN_SECRET_LENGTH, Redactor, is_secret_key

HOSTILE_VALUES = [
    r".*+?[](){}|\^$",
    "it's \"quoted\"",
    "back`tick`s and $(rm -rf /)",
    "$HOME ${PATH} %s %(x)s",
    "pässwörd-ñ-密码-🔑",
    "x" * 20_000,
    "\\1 \\g<0> replacement escapes",
]


# --- by value ---------------------------------------------------------------------------


def test_secret_as_is_is_masked() -> None:
    r = Redactor(["hunter2-long"])
    assert r("login with hunter2-long now") == f"login with {MASK} now"


def test_every_occurrence_is_masked() -> None:
    r = Redactor(["s3cr3t-value"])
    out = r("a s3cr3t-value b s3cr3t-value c")
    assert "s3cr3t-value" not in out
    assert out.count(MASK) == 2


def test_url_encoded_secret_is_masked() -> None:
    secret = "p@ss w/rd:1"
    r = Redactor([secret])
    out = r(f"GET /login?pw={quote(secret, safe='')}")
    assert quote(secret, safe="") not in out
    assert MASK in out


def test_password_of_a_database_url_is_masked_decoded_and_encoded() -> None:
    password = "p@ss:w%rd/x"
    url = f"postgres://app:{quote(password, safe='')}@db:5432/app"
    r = Redactor([url])
    assert password not in r(f"connecting with password {password}")
    assert quote(password, safe="") not in r(f"raw {quote(password, safe='')}")
    assert password not in r(url) and quote(password, safe="") not in r(url)


def test_multi_line_secret_is_masked_whole_and_line_by_line() -> None:
    secret = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\n-----END KEY-----"
    r = Redactor([secret])
    assert r(f"key:\n{secret}\n") == f"key:\n{MASK}\n"
    assert "MIIEvQIBADANBgkqhkiG9w0B" not in r("line 2 was MIIEvQIBADANBgkqhkiG9w0B")


def test_longer_secret_containing_a_shorter_one_is_masked_whole() -> None:
    r = Redactor(["abcd", "abcdefgh-long"])
    assert r("v=abcdefgh-long") == f"v={MASK}"


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_values_are_masked_literally(value: str) -> None:
    r = Redactor([value])
    out = r(f"before {value} after")
    assert out == f"before {MASK} after"


@pytest.mark.parametrize("value", HOSTILE_VALUES[:5], ids=range(5))
def test_hostile_values_do_not_mask_unrelated_text(value: str) -> None:
    text = "nothing secret here: 12345 abc"
    assert Redactor([value])(text) == text


@pytest.mark.parametrize("value", ["a", "db", "123"])
def test_values_shorter_than_the_minimum_are_not_masked(value: str) -> None:
    assert len(value) < MIN_SECRET_LENGTH
    text = f"value {value} appears in dbname 123 and a"
    assert Redactor([value])(text) == text


def test_value_of_exactly_minimum_length_is_masked() -> None:
    value = "q" * MIN_SECRET_LENGTH
    assert Redactor([value])(f"x {value} y") == f"x {MASK} y"


def test_secrets_added_later_are_masked() -> None:
    r = Redactor()
    assert r("token-added-later") == "token-added-later"
    r.add(["token-added-later"])
    assert r("token-added-later") == MASK


def test_empty_and_blank_values_are_ignored() -> None:
    r = Redactor(["", "   "])
    assert r("a  b   c") == "a  b   c"


def test_empty_text_is_returned_unchanged() -> None:
    assert Redactor(["abcd"])("") == ""


# --- by pattern ---------------------------------------------------------------------------


@pytest.mark.parametrize("url, password", [
    ("postgres://app:hunter2@db:5432/app", "hunter2"),
    ("postgresql://app:p%40ss%3Aw@db/app?sslmode=disable", "p%40ss%3Aw"),
    ("redis://:only-password@cache:6379/0", "only-password"),
    ("https://user:tok3n@git.example.com/repo.git", "tok3n"),
])
def test_credentials_in_urls_are_masked(url: str, password: str) -> None:
    out = Redactor()(f"dsn={url} end")
    assert password not in out
    assert f":{MASK}@" in out


def test_url_without_password_is_left_alone() -> None:
    text = "see https://example.com/path and postgres://app@db/app"
    assert Redactor()(text) == text


def test_url_pattern_keeps_user_and_host_readable() -> None:
    out = Redactor()("postgres://app:hunter2@db.internal:5432/app")
    assert out == f"postgres://app:{MASK}@db.internal:5432/app"


@pytest.mark.parametrize("text, secret", [
    ("API_KEY=abc123def", "abc123def"),
    ("GITHUB_TOKEN=ghp_abcdef123", "ghp_abcdef123"),
    ("JWT_SECRET=supersecretvalue", "supersecretvalue"),
    ("DB_PASSWORD=hunter22", "hunter22"),
    ("export PGPASSWORD=hunter22", "hunter22"),
    ("password: hunter22", "hunter22"),
    ('SECRET="quoted-value"', "quoted-value"),
    ("TOKEN='single-quoted'", "single-quoted"),
    ("api_key = lower-case-key", "lower-case-key"),
    ("--build-arg NPM_TOKEN=npm_abcdef", "npm_abcdef"),
])
def test_secret_assignments_are_masked(text: str, secret: str) -> None:
    out = Redactor()(text)
    assert secret not in out
    assert MASK in out


def test_assignment_keeps_the_key_and_quotes() -> None:
    assert Redactor()('API_KEY="abc123"') == f'API_KEY="{MASK}"'


@pytest.mark.parametrize("text, rest", [
    ('PASSWORD="correct horse battery"', "horse battery"),
    ("API_KEY='abc def'", "def"),
])
def test_quoted_assignment_with_spaces_is_masked_whole(text: str, rest: str) -> None:
    assert rest not in Redactor()(text)


def test_assignment_pattern_stays_on_its_line() -> None:
    text = "secrets:\n  ADMIN_API_KEY: '***'\n"
    assert Redactor()(text) == text


def test_non_secret_assignments_are_left_alone() -> None:
    text = "ENVIRONMENT=staging APP_PORT=8080 VERSION=abc1234"
    assert Redactor()(text) == text


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer x", f"Authorization: Bearer {MASK}"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-_=",
     f"Authorization: Bearer {MASK}"),
    ("curl -H 'authorization: bearer abc.def'", f"curl -H 'authorization: bearer {MASK}'"),
])
def test_bearer_tokens_are_masked(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


def test_url_password_with_raw_at_sign_is_masked_whole() -> None:
    out = Redactor()("postgres://app:p@ssw0rd@db:5432/app")
    assert "ssw0rd" not in out


# --- structures ---------------------------------------------------------------------------


def test_redact_obj_walks_nested_dicts_and_lists() -> None:
    r = Redactor(["topsecretvalue"])
    doc = {
        "a": "topsecretvalue",
        "b": [1, "x topsecretvalue y", {"c": ("topsecretvalue",)}],
        "d": {"e": {"f": "postgres://u:pw1234@h/db"}},
        "n": None, "i": 3, "t": True,
    }
    out = r.redact_obj(doc)
    assert out == {
        "a": MASK,
        "b": [1, f"x {MASK} y", {"c": [MASK]}],
        "d": {"e": {"f": f"postgres://u:{MASK}@h/db"}},
        "n": None, "i": 3, "t": True,
    }


def test_redact_obj_does_not_modify_its_input() -> None:
    doc = {"a": ["topsecretvalue"]}
    Redactor(["topsecretvalue"]).redact_obj(doc)
    assert doc == {"a": ["topsecretvalue"]}


@pytest.mark.parametrize("name, secret", [
    ("DATABASE_URL", True), ("JWT_SECRET", True), ("ADMIN_API_KEY", True),
    ("GITHUB_TOKEN", True), ("DB_PASSWORD", True), ("SENTRY_DSN", True),
    ("ENVIRONMENT", False), ("LOG_LEVEL", False), ("PORT", False),
])
def test_is_secret_key(name: str, secret: bool) -> None:
    assert is_secret_key(name) is secret


# --- hardening (issue 8, item 16) ---------------------------------------------------------


def test_lower_case_percent_escapes_are_masked() -> None:
    secret = "p@ss w/rd:1-long"
    out = Redactor([secret])(f"pw={quote(secret, safe='').lower()}")
    assert "p%40ss" not in out and MASK in out


def test_quote_plus_form_is_masked() -> None:
    from urllib.parse import quote_plus

    secret = "two words/and more"
    out = Redactor([secret])(f"form body: q={quote_plus(secret)}&x=1")
    assert quote_plus(secret) not in out and "two+words" not in out


def test_path_style_encoding_keeping_slashes_is_masked() -> None:
    secret = "a b/c@d-secret"
    out = Redactor([secret])(f"GET /x/{quote(secret)}")
    assert quote(secret) not in out


def test_unterminated_quoted_assignment_is_masked() -> None:
    out = Redactor()('JWT_SECRET="never-closed-value and the rest')
    assert "never-closed" not in out and MASK in out


@pytest.mark.parametrize("line", [
    "A" * 100_000, "KEY" * 33_334, "A_KEY_" * 16_667, "a" * 100_000, "a." * 50_000,
    'KEY="' * 20_000, "a://b:" * 16_667,
], ids=["upper", "key-words", "key-underscores", "lower", "dotted", "open-quotes", "urls"])
def test_a_100_kb_line_is_redacted_in_linear_time(line: str) -> None:
    # Regression guard: the assignment pattern took 38 s (quadratic) on such a line; a
    # generous bound keeps the test stable on a loaded machine.
    import time

    redactor = Redactor(["some-secret-value"])
    start = time.monotonic()
    redactor(line)
    assert time.monotonic() - start < 1.0


def test_secret_escaped_by_repr_or_json_is_masked() -> None:
    import json

    secret = 'back\\slash"quote-value'
    r = Redactor([secret])
    assert "slash" not in r(repr(secret)) and "slash" not in r(json.dumps(secret))
