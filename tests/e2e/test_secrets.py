"""Canary secrets never leak (SPEC section 8).

Every variable of the env file holds a unique random canary, one of them hostile (quotes,
spaces, `$(...)`, backticks, non-ASCII), and the database password holds `@`, `:`, `%` and `/`
(URL-encoded in the URLs) for a dedicated PostgreSQL role that owns the app's database. With
TOGATHER_DEBUG=1 the test runs a deploy, a second deploy, a failing deploy (exit 4), a dry run
and a rollback (plus the read-only commands), while a thread samples the command line of every
process on the host. No canary, in any of its forms, may show up in the CLI's output, the run
logs, the host's audit log, the state file, the webhook payloads, any process's command line,
or any file of the remote directory except the two mode-600 secret files. And the app must
really work with those secrets: the odd password reached the containers, pg_dump and dbmate.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from conftest import PENDING_MIGRATION, DemoApp, WebhookReceiver, psql_admin, quote_ident, run
from dotenv import dotenv_values

DEBUG = {"TOGATHER_DEBUG": "1"}
SECRET_FILES = ("app.env", ".pgpass")


def canary(label: str) -> str:
    return f"cnry{label}{secrets.token_hex(8)}"


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def canary_role() -> Iterator[tuple[str, str]]:
    """A LOGIN role whose password has `@`, `:`, `%` and `/` (set by SQL on stdin, never on a
    command line). Requested before demo_app_factory, so it is dropped after the app's
    database is."""
    name = f"e2e_canary_{secrets.token_hex(4)}"
    password = f"Cn@ry:9%x/{canary('db')}"
    psql_admin(f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)};")
    yield name, password
    rows = psql_admin("SELECT datname, pg_get_userbyid(datdba) FROM pg_database;").splitlines()
    owned = [row.split("|")[0] for row in rows if row.split("|")[-1] == name]
    for database in owned:  # only when the app's teardown did not drop it
        psql_admin(f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE);")
    psql_admin(f"DROP ROLE IF EXISTS {quote_ident(name)};")


class CmdlineSampler:
    """Reads /proc/*/cmdline of every process (all users: root reads them all) every
    `interval` seconds in a thread; keeps each distinct command line once. Bounded in time and
    in memory."""

    def __init__(self, interval: float = 0.05, max_seconds: float = 900,
                 max_distinct: int = 200_000) -> None:
        self.interval = interval
        self.max_seconds = max_seconds
        self.max_distinct = max_distinct
        self.seen: set[bytes] = set()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            if data:
                self.seen.add(data.replace(b"\0", b" "))

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline \
                and len(self.seen) < self.max_distinct:
            self._sample()
            self.rounds += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> CmdlineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def matching(self, needle: bytes) -> list[bytes]:
        return [line for line in self.seen if needle in line]


# --- the canary app -------------------------------------------------------------------------


def env_value(value: str) -> str:
    """A python-dotenv double-quoted value (escapes for `\\` and `"`; `$` is literal because
    the tool reads the file without interpolation)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_credentials(url: str, user: str, password: str, database: str) -> str:
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


def make_canary_app(app: DemoApp, role: str, password: str, webhook_url: str) -> dict[str, str]:
    """Rewrite the app's env file with a canary in every variable and the role's URLs; the app's
    database changes owner to the role. Returns the env file's values."""
    hostile = (f"it's \"quoted\" and spaced $(touch /tmp/pwned-{app.hex}) "
               f"`touch /tmp/pwned-{app.hex}` caf\u00e9 \u2713 \u5bc6 {canary('hostile')}")
    values = {
        "ENVIRONMENT": app.env,
        "DATABASE_URL": with_credentials(app.secrets["DATABASE_URL"], role, password,
                                         app.database),
        "DEPLOY_DATABASE_URL": with_credentials(app.secrets["DEPLOY_DATABASE_URL"], role,
                                                password, app.database),
        "JWT_SECRET": canary("jwt"),
        "ADMIN_API_KEY": canary("admin"),
        "SMTP_PASSWORD": canary("smtp"),
        "STRIPE_TOKEN": canary("stripe"),
        "SESSION_SECRET": canary("session"),
        "WELCOME_BANNER": hostile,  # a name that does not look secret: redacted by value only
    }
    assert "%40" in values["DATABASE_URL"] and "%3A" in values["DATABASE_URL"]
    assert "%25" in values["DATABASE_URL"] and "%2F" in values["DATABASE_URL"]
    app.env_file.write_text("".join(f"{k}={env_value(v)}\n" for k, v in values.items()))
    os.chmod(app.env_file, 0o600)
    parsed = dotenv_values(app.env_file, interpolate=False)
    assert parsed == values, "the env file does not parse back to the canaries"
    app.secrets = dict(values)
    app.role = role
    psql_admin(f"ALTER DATABASE {quote_ident(app.database)} OWNER TO {quote_ident(role)};")
    return values


def leak_forms(values: dict[str, str], password: str) -> dict[str, str]:
    """Every form a canary could leak in, by a name that does not reveal it: raw, URL-encoded,
    the decoded and encoded database password, and each canary's random core."""
    forms: dict[str, str] = {}
    for key, value in values.items():
        if key == "ENVIRONMENT":
            continue
        forms[f"{key} (raw)"] = value
        forms[f"{key} (url-encoded)"] = quote(value, safe="")
    forms["database password (decoded)"] = password
    forms["database password (url-encoded)"] = quote(password, safe="")
    for key, value in values.items():
        for word in value.split():
            if word.startswith("cnry"):
                forms[f"{key} (canary core)"] = word
    forms["database password (canary core)"] = password.rsplit("/", 1)[1]
    return forms


def find_leaks(forms: dict[str, str], places: list[tuple[str, bytes]]) -> list[str]:
    leaks = []
    for where, data in places:
        for name, form in forms.items():
            if form.encode() in data:
                leaks.append(f"{name} in {where}")
    return leaks


# --- the test -------------------------------------------------------------------------------


def ok(result, code: int = 0) -> None:
    assert result.returncode == code, (f"exit {result.returncode}, expected {code}:\n"
                                       f"{result.stdout}\n{result.stderr}")
    assert "Traceback" not in result.stdout + result.stderr


def assert_healthy(app: DemoApp, version: str) -> None:
    status, _, body = app.get("/health")
    assert status == 200, body
    health = json.loads(body)
    assert health["status"] == "healthy", health
    assert health["checks"]["database"]["status"] == "pass", health
    assert health["version"].startswith(version[:7]), health
    assert app.served()[1]["version"] == version[:7]


def container_env(app: DemoApp, slot: str) -> list[str]:
    cid = next(c["id"] for c in app.containers() if c["service"] == f"app-{slot}")
    out = run(["docker", "inspect", "--format", "{{json .Config.Env}}", cid]).stdout
    return json.loads(out)


def test_canary_secrets_never_leak(canary_role: tuple[str, str], demo_app_factory,
                                   receiver: WebhookReceiver) -> None:
    role, password = canary_role
    app: DemoApp = demo_app_factory()
    values = make_canary_app(app, role, password, receiver.url)
    forms = leak_forms(values, password)
    overrides = {"notifications": {"webhook_url": receiver.url}}
    app.write_config(**overrides)

    control = canary("control")  # a positive control: the sampler must see this one
    with CmdlineSampler() as sampler:
        run(["sh", "-c", "sleep 0.3", control])
        first = app.head
        ok(app.deploy(env=DEBUG))
        assert_healthy(app, first)
        blue_env = container_env(app, "blue")

        second = app.commit("second", {"app/VERSION_NOTE": "2\n", **PENDING_MIGRATION})
        ok(app.deploy(env=DEBUG))
        assert_healthy(app, second)

        app.set_health_mode("crash")
        app.write_config(**overrides, deployment={"health_check": {"retries": 6}})
        ok(app.deploy(env=DEBUG), 4)
        assert_healthy(app, second)

        ok(app.deploy("--dry-run", env=DEBUG))
        app.write_config(**overrides)
        ok(app.inv("rollback", app.env_flag, env=DEBUG))
        assert_healthy(app, first)

        for args in (("status", "--json"), ("history",), ("health",), ("lock.status",),
                     ("db.snapshots",), ("config.validate",)):
            ok(app.inv(args[0], app.env_flag, *args[1:], env=DEBUG))
        shows = [app.inv("config.show", app.env_flag, env=DEBUG),
                 app.inv("config.show", app.env_flag, "--json", env=DEBUG)]
        for show in shows:
            ok(show)
            leaks = find_leaks(forms, [("config.show", (show.stdout + show.stderr).encode())])
            assert not leaks, leaks
            assert app.name in show.stdout and "WELCOME_BANNER" in show.stdout

    # The secrets really worked: the containers got them verbatim (Compose's env_file quoting),
    # dbmate migrated as the role, pg_dump wrote readable snapshots.
    for key in ("JWT_SECRET", "WELCOME_BANNER", "DATABASE_URL"):
        assert f"{key}={values[key]}" in blue_env, f"{key} did not reach the container verbatim"
    assert not any(e.startswith("DEPLOY_DATABASE_URL=") for e in blue_env)
    assert not list(Path("/tmp").glob(f"pwned-{app.hex}*")), "a secret value reached a shell"
    owners = psql_admin("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public';",
                        database=app.database).split()
    assert owners == [role], owners
    assert sorted(app.tables()) == ["events", "jobs", "notes", "schema_migrations"]
    dumps = app.snapshots()
    assert len(dumps) >= 2, dumps
    for dump in dumps:
        run(["pg_restore", "--list", str(dump)])
    events = [json.loads(raw)["event"] for raw in receiver.raw]
    assert {"started", "completed", "failed", "rolled_back"} <= set(events), events

    # The two secret files, and only they, hold the secrets; both mode 600.
    root = Path(app.remote_dir)
    for name in SECRET_FILES:
        mode = stat.S_IMODE((root / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:03o}"
    assert values["JWT_SECRET"].encode() in (root / "app.env").read_bytes()

    places: list[tuple[str, bytes]] = []
    for result in app.runs:
        places.append((f"stdout of {result.args[1:]}", result.stdout.encode()))
        places.append((f"stderr of {result.args[1:]}", result.stderr.encode()))
    logs = [p for p in app.log_dir.rglob("*") if p.is_file()]
    assert logs, "no run logs written"
    places += [(f"run log {p.name}", p.read_bytes()) for p in logs]
    places.append(("the audit.log", (root / "audit.log").read_bytes()))
    places.append(("the state file", app.state_bytes() or b""))
    places += [(f"webhook payload {i}", raw) for i, raw in enumerate(receiver.raw)]
    places += [("a process command line", line) for line in sampler.seen]
    remote_files = [p for p in root.rglob("*")
                    if p.is_file() and p.relative_to(root).as_posix() not in SECRET_FILES]
    assert remote_files
    places += [(f"remote file {p.relative_to(root)}", p.read_bytes()) for p in remote_files]
    leaks = find_leaks(forms, places)
    assert not leaks, "secrets leaked: " + "; ".join(sorted(set(leaks)))

    # The sampler really watched the host (the deploy user's remote shells included).
    assert sampler.rounds >= 50, sampler.rounds
    assert sampler.matching(b"docker compose"), "no `docker compose` command line was sampled"
    assert sampler.matching(control.encode()), "the sampler missed the positive control"
    for program in (b"pg_dump", b"dbmate"):
        assert sampler.matching(program), f"no {program.decode()} command line was sampled"
    app.assert_no_secrets(*(raw.decode() for raw in receiver.raw))
