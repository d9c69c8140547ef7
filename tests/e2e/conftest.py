"""Fixtures of the end-to-end suite: real deploys against the real test bed.

The test bed (scripts/testbed-up.sh) is this machine: Docker Engine + Compose v2, an sshd on
127.0.0.1:2222 reachable as the ssh alias `togather-testbed` (user `deploy`), PostgreSQL 15 with
the roles `togather_development` / `togather_staging`, and dbmate. Nothing here is mocked: every
test runs the real `inv` CLI as a subprocess, and checks what happened on the host (state file,
containers, nginx answers, database).

Reusable pieces, for any test under tests/e2e:

- every test here is marked `e2e` (see `pytest_collection_modifyitems`);
- `testbed` (session, autouse): skips the whole directory when the test bed is down, or FAILS
  it when the environment variable CI=true (CI must never silently skip);
- `demo_app` (function): a fresh, isolated copy of examples/demo deployed as its own app (unique
  app name, compose project, ports, remote directory and PostgreSQL database), with helpers to
  run the CLI and look at the result; everything is removed afterwards, even on failure.
  Parametrize it indirectly to change the environment:
      @pytest.mark.parametrize("demo_app", ["development"], indirect=True)
- `demo_app_factory` (function): the same, for a test that needs several apps or options;
- `compat_schema` / `assert_state_valid`: the original tools' state-file schema
  (../shared/compat/deployment-state.schema.json) and a validator;
- `cli_failure(result, contains=..., code=None)`: a failed run with one `error:` line and no
  traceback; `new_ulid()`, `free_port()`.

DemoApp in short (see its docstrings): `inv(...)`, `deploy(...)`, `spawn(...)` (a `Running`
process to wait on and signal), `commit(...)`, `set_health_mode(...)`, `write_config(...)`,
`state()` (parsed and validated against both schemas on every read), `put_state(...)`,
`tree()`, `snapshots()`, `get(...)`, `served()`, `psql(...)`, `tables()`,
`scratch_database()`, `compose(...)`, `containers()`, `container_state(...)`,
`assert_no_secrets()`.

The host of both environments is this machine (`staging` over SSH as `deploy`, `development`
as `local`), so the fixtures inspect the host's files, containers and database directly as root.

Images are deliberately kept between tests (same layers, faster builds); containers, networks,
databases and remote directories are not.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import jsonschema
import pytest
import yaml
from dotenv import dotenv_values

from togather_tasks.config import deep_merge

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parents[1]
DEMO_SRC = REPO_ROOT / "examples" / "demo"
TESTBED_ENV_DIR = DEMO_SRC / "config" / "environments"
PACKAGE_STATE_SCHEMA = REPO_ROOT / "togather_tasks" / "schemas" / "deployment-state.schema.json"
COMPAT_DIR = Path(os.environ.get("TOGATHER_COMPAT_DIR") or REPO_ROOT.parent / "shared" / "compat")
COMPAT_STATE_SCHEMA = COMPAT_DIR / "deployment-state.schema.json"

# The CLI under test lives next to the interpreter running pytest (.venv/bin in CI).
INV = Path(sys.executable).parent / "inv"

SSH_ALIAS = "togather-testbed"
REMOTE_BASE = "/srv/togather"
HOST_FOR_ENV = {"staging": SSH_ALIAS, "development": "local"}
PORT_RANGE = (20000, 29999)
OPERATOR_EMAIL = "e2e@example.com"
PAUSE_ENV = "TOGATHER_TEST_PAUSE_BEFORE"
DEFAULT_TIMEOUT = 300
# A migration to commit where a test needs one pending (a deploy without one takes no snapshot).
PENDING_MIGRATION = {"db/migrations/20260301000001_add_notes.sql":
                     "-- migrate:up\nCREATE TABLE notes (id int);\n"
                     "-- migrate:down\nDROP TABLE notes;\n"}


# ---------------------------------------------------------------------------------------------
# marking and the test-bed gate


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e as `e2e` (so `-m e2e` / `-m 'not e2e'` select them)."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def _probe(args: list[str], timeout: float = 30) -> str | None:
    """None when the command succeeds, else a short reason."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                cwd="/", check=False)
    except FileNotFoundError:
        return f"`{args[0]}` is not installed"
    except subprocess.TimeoutExpired:
        return f"`{' '.join(args)}` did not answer within {timeout:g} s"
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`{' '.join(args)}` failed (exit {result.returncode}): {detail}"
    return None


@functools.cache
def testbed_problems() -> tuple[str, ...]:
    """Everything missing for the e2e suite (empty when the test bed is usable)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the e2e suite runs as root (it creates databases via runuser postgres "
                        "and inspects the host's files)")
    if not INV.exists():
        problems.append(f"{INV} not found: install the package in the interpreter's venv")
    for args in (["docker", "info"],
                 ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", SSH_ALIAS, "true"],
                 ["docker", "image", "inspect", "debian:bookworm-slim"]):
        if problem := _probe(args):
            problems.append(problem)
    if os.geteuid() == 0 and (problem := _probe(["runuser", "-u", "postgres", "--", "psql",
                                                  "-X", "-Atc", "SELECT 1"])):
        problems.append(problem)
    for env in HOST_FOR_ENV:
        if not (TESTBED_ENV_DIR / f".env.{env}").is_file():
            problems.append(f"{TESTBED_ENV_DIR / f'.env.{env}'} is missing")
    return tuple(problems)


@pytest.fixture(scope="session", autouse=True)
def testbed() -> None:
    """Skip the e2e tests when the test bed is not up (`make testbed` starts it); with CI=true
    fail them instead: CI must never pass by skipping."""
    problems = testbed_problems()
    if not problems:
        return
    reason = ("test bed not available (start it with `make testbed`): " + "; ".join(problems))
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true and the " + reason, pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# schemas


@functools.cache
def _validator(path: Path) -> jsonschema.Draft202012Validator:
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def validate_state(doc: Any, *, where: str = "state") -> None:
    """Assert `doc` is a valid state file: against the original tools' schema (when
    ../shared/compat is present) and against the package's own schema."""
    schemas = [p for p in (COMPAT_STATE_SCHEMA, PACKAGE_STATE_SCHEMA) if p.is_file()]
    assert schemas, "no state schema found"
    for path in schemas:
        errors = sorted(_validator(path).iter_errors(doc), key=lambda e: list(e.absolute_path))
        details = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                   for e in errors[:10]]
        assert not errors, f"{where} does not validate against {path}:\n" + "\n".join(details)


@pytest.fixture
def compat_schema() -> dict[str, Any]:
    """The original state-file schema (skips the test when ../shared/compat is absent)."""
    if not COMPAT_STATE_SCHEMA.is_file():
        pytest.skip(f"{COMPAT_STATE_SCHEMA} not present")
    return json.loads(COMPAT_STATE_SCHEMA.read_text())


@pytest.fixture
def assert_state_valid() -> Callable[[Any], None]:
    """`assert_state_valid(doc)`: Draft 2020-12 with format checks against the compat schema
    (when ../shared/compat is present; combine with `compat_schema` to require it) and the
    package's own schema. `DemoApp.state()` applies the same checks to every read."""
    return validate_state


# ---------------------------------------------------------------------------------------------
# small helpers


def run(args: list[str], *, check: bool = True, timeout: float = 120, input: str | bytes | None
        = None, cwd: str | Path = "/", **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output and a bounded time."""
    text = not isinstance(input, bytes)
    result = subprocess.run(args, capture_output=True, text=text, timeout=timeout,
                            input=input, cwd=cwd, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed (exit {result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def free_ports(count: int, *, exclude: set[int] = frozenset()) -> list[int]:
    """`count` distinct TCP ports in PORT_RANGE that nothing listens on (127.0.0.1 and all
    interfaces), chosen at random so concurrent runs rarely collide."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randint(*PORT_RANGE)
        if port in chosen or port in exclude:
            continue
        ok = True
        for address in ("127.0.0.1", "0.0.0.0"):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((address, port))
                except OSError:
                    ok = False
                    break
        if ok:
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free ports found")


def psql_admin(sql: str, *, database: str = "postgres", timeout: float = 60) -> str:
    """Run SQL (from stdin, never on a command line) as the postgres superuser."""
    return run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1", "-d", database], input=sql, timeout=timeout).stdout


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def drop_database(name: str) -> None:
    psql_admin(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);")


def ulid_like() -> str:
    """A 26-character Crockford base32 string (valid in the state schemas' id patterns)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "0" + "".join(secrets.choice(alphabet) for _ in range(25))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(result: subprocess.CompletedProcess, *, contains: str,
                         code: int | None = None) -> str:
    """A failed run that printed one `error: ...` line containing `contains` (case-insensitive)
    and no traceback. Returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{output}"
    if code is not None:
        assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{output}"
    assert "Traceback" not in output, output
    errors = error_lines(result.stderr)
    assert len(errors) == 1, f"expected one error line, got {errors}:\n{output}"
    assert contains.lower() in errors[0].lower(), f"{contains!r} not in {errors[0]!r}"
    return errors[0]


# ---------------------------------------------------------------------------------------------
# a running CLI process (for signal and concurrency tests)


class Running:
    """A `subprocess.Popen` of the CLI whose stdout/stderr are read by threads, so a test can
    wait (bounded) for a line and then signal the process."""

    def __init__(self, popen: subprocess.Popen, on_done: Callable[[subprocess.CompletedProcess],
                                                                   None]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self._on_done = on_done
        self._result: subprocess.CompletedProcess | None = None
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((popen.stdout, self._out), (popen.stderr, self._err))]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: Any, buf: list[str]) -> None:
        for line in iter(stream.readline, ""):
            with self._cond:
                buf.append(line)
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    def wait_for_stdout(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first stdout line matching `pattern`; fails if the process ends first or the
        time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._out[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self._out)
                if self.popen.poll() is not None and all(not t.is_alive()
                                                         for t in self._threads):
                    raise AssertionError(f"process exited ({self.popen.returncode}) before "
                                         f"printing /{pattern}/:\n{''.join(self._out)}"
                                         f"{''.join(self._err)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no /{pattern}/ on stdout within {timeout:g} s:\n"
                                         f"{''.join(self._out)}{''.join(self._err)}")
                self._cond.wait(min(left, 0.5))

    def send(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
        """Wait for the exit (bounded) and return the CompletedProcess."""
        if self._result is None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
                raise AssertionError(f"process {self.pid} did not exit within {timeout:g} s:"
                                     f"\n{self.stdout}{self.stderr}") from None
            for thread in self._threads:
                thread.join(10)
            self._result = subprocess.CompletedProcess(self.popen.args, self.popen.returncode,
                                                       self.stdout, self.stderr)
            self._on_done(self._result)
        return self._result

    def ensure_gone(self) -> None:
        """Teardown: kill this process (by its own pid) if it is still running."""
        if self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        with contextlib.suppress(AssertionError):
            self.wait(10)


# ---------------------------------------------------------------------------------------------
# the demo app


@dataclass
class DemoApp:
    """One isolated copy of examples/demo, ready to deploy to `env`.

    Attributes: `path` (the git repository), `env`, `name` (app.name, `e2e-<hex>`), `project`
    (the compose project), `ports` (proxy/blue/green), `remote_dir`, `database`, `role`,
    `secrets` (the env file's values), `log_dir` (TOGATHER_LOG_DIR of every run), `runs` (every
    CompletedProcess of the CLI so far).
    """

    path: Path
    env: str
    hex: str
    ports: dict[str, int]
    remote_dir: str
    database: str
    role: str
    secrets: dict[str, str]
    log_dir: Path
    tmp: Path
    base_config: dict[str, Any]
    runs: list[subprocess.CompletedProcess] = field(default_factory=list)
    spawned: list[Running] = field(default_factory=list)
    scratch_databases: list[str] = field(default_factory=list)

    # --- identity ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"e2e-{self.hex}"

    @property
    def project(self) -> str:
        return f"{self.name}-{self.env}"

    @property
    def host(self) -> str:
        return HOST_FOR_ENV[self.env]

    @property
    def env_flag(self) -> str:
        return f"--env={self.env}"

    @property
    def state_path(self) -> Path:
        return Path(self.remote_dir) / "deployment-state.json"

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.remote_dir) / "snapshots"

    @property
    def env_file(self) -> Path:
        return self.path / "config" / "environments" / f".env.{self.env}"

    @property
    def secret_values(self) -> dict[str, str]:
        """Every value that must never be printed, logged or stored (by key, for messages)."""
        values = {k: v for k, v in self.secrets.items() if k != "ENVIRONMENT" and v}
        for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
            password = urlsplit(self.secrets.get(key, "")).password
            if password:
                values[f"{key} (password)"] = unquote(password)
        return values

    # --- the CLI ----------------------------------------------------------------------------

    def process_env(self, env: dict[str, str | None] | None = None) -> dict[str, str]:
        """os.environ + TOGATHER_LOG_DIR + `env` (a None value removes a variable)."""
        out = dict(os.environ)
        out.pop(PAUSE_ENV, None)
        out["TOGATHER_LOG_DIR"] = str(self.log_dir)
        for key, value in (env or {}).items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    def inv(self, *args: str, env: dict[str, str | None] | None = None, check: bool = False,
            timeout: float = DEFAULT_TIMEOUT, **popen_kwargs: Any) -> subprocess.CompletedProcess:
        """Run `inv ARGS` in the repository (e.g. `app.inv("deploy", app.env_flag)`).

        `env` adds (or with None removes) environment variables; `check` asserts exit 0. The
        result (text stdout/stderr) is also kept in `runs` for `assert_no_secrets`."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        try:
            result = subprocess.run([str(INV), *args], cwd=self.path, env=self.process_env(env),
                                    capture_output=True, text=True, timeout=timeout,
                                    check=False, **popen_kwargs)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"inv {' '.join(args)} did not finish within {timeout:g} s:\n"
                                 f"{exc.stdout}\n{exc.stderr}") from None
        self.runs.append(result)
        if check:
            assert result.returncode == 0, (f"inv {' '.join(args)} exited "
                                            f"{result.returncode}:\n{result.stdout}\n"
                                            f"{result.stderr}")
        return result

    def spawn(self, *args: str, env: dict[str, str | None] | None = None,
              **popen_kwargs: Any) -> Running:
        """Start `inv ARGS` without waiting (see `Running`); killed at teardown if still alive."""
        popen = subprocess.Popen([str(INV), *args], cwd=self.path, env=self.process_env(env),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, **popen_kwargs)
        running = Running(popen, self.runs.append)
        self.spawned.append(running)
        return running

    def deploy(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """`inv deploy --env=ENV ARGS`."""
        return self.inv("deploy", self.env_flag, *args, **kwargs)

    # --- the repository ---------------------------------------------------------------------

    def git(self, *args: str) -> str:
        return run(["git", *args], cwd=self.path).stdout.strip()

    def commit(self, message: str, files: dict[str, str | bytes | None] | None = None) -> str:
        """Write `files` (relative path -> content; None deletes), commit everything, return
        the new commit's 40-character SHA."""
        for rel, content in (files or {}).items():
            target = self.path / rel
            if content is None:
                target.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    @property
    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def set_health_mode(self, mode: str) -> str:
        """Commit app/HEALTH_MODE (healthy, degraded, unhealthy, crash, slow); returns the SHA."""
        return self.commit(f"HEALTH_MODE={mode}", {"app/HEALTH_MODE": f"{mode}\n"})

    def config_document(self, **overrides: Any) -> dict[str, Any]:
        return deep_merge(self.base_config, overrides)

    def write_config(self, *, commit: bool = False, **overrides: Any) -> dict[str, Any]:
        """Rewrite config/deployment.yml as the fixture's base config deep-merged with
        `overrides` (top-level sections, e.g. `database={"migration_tool": "golang-migrate"}`
        or `environments={"staging": {"hosts": ["alias"]}}`). Not cumulative: each call starts
        from the base. The deploy reads the working tree, so committing is optional."""
        document = self.config_document(**overrides)
        (self.path / "config" / "deployment.yml").write_text(
            "# written by the e2e fixtures\n" + yaml.safe_dump(document, sort_keys=False))
        if commit:
            self.commit("config: " + ", ".join(sorted(overrides)) if overrides else "config")
        return document

    # --- the host ---------------------------------------------------------------------------

    def state_bytes(self) -> bytes | None:
        """The state file's bytes on the host (the host is this machine: read as root)."""
        try:
            return self.state_path.read_bytes()
        except FileNotFoundError:
            return None

    def state(self, *, validate: bool = True) -> dict[str, Any] | None:
        """The state file on the host, parsed (None when absent). Validated against the compat
        schema and the package's schema unless validate=False."""
        data = self.state_bytes()
        if data is None:
            return None
        doc = json.loads(data)
        if validate:
            validate_state(doc, where=str(self.state_path))
        return doc

    def put_state(self, doc: dict[str, Any]) -> None:
        """Install a hand-made state file on the host as the deploy user would have it (over
        ssh for staging, locally for development). The document is validated first."""
        validate_state(doc, where="the hand-made state")
        data = json.dumps(doc, indent=2) + "\n"
        if self.host == "local":
            Path(self.remote_dir).mkdir(parents=True, exist_ok=True)
            self.state_path.write_text(data)
        else:
            run(["ssh", "-o", "BatchMode=yes", self.host,
                 f"mkdir -p {self.remote_dir} && cat > {self.state_path}.tmp && "
                 f"mv {self.state_path}.tmp {self.state_path}"], input=data)

    def audit_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (Path(self.remote_dir) / "audit.log").read_text()
        return ""

    def tree(self) -> dict[str, tuple[int, int, int]] | None:
        """The remote directory, recursively: relative path -> (mode, size, mtime_ns); None
        when it does not exist."""
        root = Path(self.remote_dir)
        if not root.exists():
            return None
        listing = {}
        for path in sorted([root, *root.rglob("*")]):
            st = path.lstat()
            listing[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return listing

    def snapshots(self) -> list[Path]:
        if not self.snapshot_dir.is_dir():
            return []
        return sorted(self.snapshot_dir.glob("*.dump"))

    # --- HTTP through the proxy -------------------------------------------------------------

    def get(self, path: str, port: int | None = None,
            timeout: float = 5) -> tuple[int, dict[str, str], str]:
        """GET http://127.0.0.1:PORT/path (the proxy by default): (status, headers with
        lower-case names, body text)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.ports["proxy"],
                                          timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            return (resp.status, {k.lower(): v for k, v in resp.getheaders()},
                    resp.read().decode("utf-8", "replace"))
        finally:
            conn.close()

    def served(self, port: int | None = None) -> tuple[str | None, dict[str, Any]]:
        """(X-Togather-Slot header, /version body) as answered through the proxy."""
        status, headers, body = self.get("/version", port)
        assert status == 200, f"GET /version -> {status}: {body}"
        return headers.get("x-togather-slot"), json.loads(body)

    # --- database and containers ------------------------------------------------------------

    def psql(self, sql: str, *, as_owner: bool = True) -> str:
        """Run SQL against this app's database as root (runuser postgres), SQL on stdin.
        With as_owner (default) it runs as the environment's role, so objects it creates are
        owned like the app's own. Returns psql's unaligned, tuples-only output."""
        prefix = f"SET ROLE {quote_ident(self.role)};\n" if as_owner else ""
        return psql_admin(prefix + sql, database=self.database)

    def tables(self, database: str | None = None) -> list[str]:
        out = psql_admin("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                         "ORDER BY 1;", database=database or self.database)
        return out.split()

    def scratch_database(self) -> str:
        """A new empty database (dropped at teardown)."""
        name = f"e2e_{self.hex}_scratch{len(self.scratch_databases)}"
        psql_admin(f"CREATE DATABASE {quote_ident(name)};")
        self.scratch_databases.append(name)
        return name

    def compose_files_exist(self) -> bool:
        root = Path(self.remote_dir)
        return (root / "compose.yml").is_file() and (root / "slots.env").is_file()

    def compose(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """`docker compose -p PROJECT ARGS` on this machine (with the project's files from the
        remote directory when they exist)."""
        root = self.remote_dir
        files = (["--project-directory", root, "-f", f"{root}/compose.yml", "--env-file",
                  f"{root}/slots.env"] if self.compose_files_exist() else [])
        return run(["docker", "compose", "-p", self.project, *files, *args], check=check,
                   timeout=180)

    def containers(self) -> list[dict[str, str]]:
        """The project's containers: [{id, service, state, image}] (running or not)."""
        out = run(["docker", "ps", "-a", "--no-trunc", "--filter",
                   f"label=com.docker.compose.project={self.project}", "--format",
                   '{{.ID}}\t{{.Label "com.docker.compose.service"}}\t{{.State}}\t'
                   '{{.Image}}']).stdout
        rows = []
        for line in out.splitlines():
            cid, service, state, image = line.split("\t")
            rows.append({"id": cid, "service": service, "state": state, "image": image})
        return sorted(rows, key=lambda r: r["service"])

    def container_state(self, slot_or_service: str) -> str | None:
        """`running`, `exited`, `created`, `restarting`... of a slot (`blue`/`green`) or a
        service (`proxy`); None when the container does not exist."""
        service = (f"app-{slot_or_service}" if slot_or_service in ("blue", "green")
                   else slot_or_service)
        states = [c["state"] for c in self.containers() if c["service"] == service]
        return states[0] if states else None

    # --- secrets ----------------------------------------------------------------------------

    def assert_no_secrets(self, *texts: str) -> None:
        """No secret value of the env file in: any CLI output so far, any run log in
        TOGATHER_LOG_DIR, the host's state file and audit log, or `texts`. Messages name the
        key and the place, never the value."""
        places: list[tuple[str, str]] = []
        for i, result in enumerate(self.runs):
            places.append((f"stdout of run {i} ({result.args[1:3]})", result.stdout or ""))
            places.append((f"stderr of run {i} ({result.args[1:3]})", result.stderr or ""))
        if self.log_dir.exists():
            for path in sorted(self.log_dir.rglob("*")):
                if path.is_file():
                    places.append((str(path), path.read_text(errors="replace")))
        places.append(("the state file", (self.state_bytes() or b"").decode(errors="replace")))
        places.append(("the host's audit.log", self.audit_log()))
        places += [(f"text {i}", t) for i, t in enumerate(texts)]
        leaks = [f"{key} in {where}" for where, text in places
                 for key, value in self.secret_values.items() if value in text]
        assert not leaks, "secrets leaked: " + "; ".join(leaks)

    # --- teardown ---------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Remove everything this app created except images; returns what went wrong."""
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], Any]) -> None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever fails
                problems.append(f"{what}: {exc}")

        for running in self.spawned:
            attempt(f"stop process {running.pid}", running.ensure_gone)
        if self.compose_files_exist():
            attempt("compose down", lambda: self.compose("down", "--remove-orphans",
                                                         "--timeout", "2", check=True))

        def remove_leftovers() -> None:
            ids = [c["id"] for c in self.containers()]
            if ids:
                run(["docker", "rm", "-f", *ids], timeout=120)
            networks = run(["docker", "network", "ls", "-q", "--filter",
                            f"label=com.docker.compose.project={self.project}"]).stdout.split()
            for network in networks:
                run(["docker", "network", "rm", network], check=False)

        attempt("remove containers", remove_leftovers)
        for name in [self.database, *self.scratch_databases]:
            attempt(f"drop database {name}", functools.partial(drop_database, name))
        attempt("remove remote dir",
                lambda: shutil.rmtree(Path(self.remote_dir).parent, ignore_errors=False)
                if Path(self.remote_dir).parent.exists() else None)
        return problems


def _testbed_secrets(env: str) -> dict[str, str]:
    values = dotenv_values(TESTBED_ENV_DIR / f".env.{env}", interpolate=False)
    return {k: v or "" for k, v in values.items()}


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _env_line(key: str, value: str) -> str:
    if re.search(r"[\s#'\"\\$]", value):
        return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
    return f"{key}={value}"


def _base_config(app_name: str, env: str, remote_dir: str, ports: dict[str, int]
                 ) -> dict[str, Any]:
    """The demo's deployment.yml with this app's identity and shorter waits."""
    document = yaml.safe_load((DEMO_SRC / "config" / "deployment.yml").read_text())
    document["app"]["name"] = app_name
    document["deployment"] = deep_merge(document.get("deployment") or {}, {
        "health_check": {"interval": 0.5, "retries": 40},
        "drain_seconds": 1,
        "stop_timeout": 5,
    })
    document["proxy"] = {**(document.get("proxy") or {}), "bind": "127.0.0.1"}
    document["environments"] = {env: {
        "hosts": [HOST_FOR_ENV[env]],
        "remote_dir": remote_dir,
        "ports": dict(ports),
        "public_url": f"http://127.0.0.1:{ports['proxy']}",
    }}
    return document


AppT = TypeVar("AppT", bound="DemoApp")


def pin_proxy_engine(request: pytest.FixtureRequest, app: AppT) -> AppT:
    """The engine of the test's `proxy_engine` marker (the tests of one engine's own
    behaviour: nginx's worker processes, `nginx -t`); else the product's default."""
    marker = request.node.get_closest_marker("proxy_engine")
    if marker is not None:
        app.base_config["proxy"] = {**app.base_config.get("proxy", {}),
                                    "engine": marker.args[0]}
    return app


def new_demo_app(tmp: Path, env: str = "staging") -> DemoApp:
    """A DemoApp in `tmp`, not set up yet (no side effects outside `tmp`): call `setup_demo_app`
    after registering it for teardown."""
    assert env in HOST_FOR_ENV, f"no test-bed host for environment {env!r}"
    hexid = secrets.token_hex(4)
    ports = dict(zip(("proxy", "blue", "green"), free_ports(3), strict=True))
    remote_dir = f"{REMOTE_BASE}/e2e-{hexid}/{env}"
    testbed = _testbed_secrets(env)
    database = f"e2e_{hexid}"
    role = unquote(urlsplit(testbed["DATABASE_URL"]).username or "")
    assert role, "the test bed's DATABASE_URL names no role"
    secrets_ = dict(testbed)
    for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
        if secrets_.get(key):
            secrets_[key] = _with_database(secrets_[key], database)
    return DemoApp(path=tmp / "repo", env=env, hex=hexid, ports=ports, remote_dir=remote_dir,
                   database=database, role=role, secrets=secrets_, log_dir=tmp / "logs",
                   tmp=tmp, base_config=_base_config(f"e2e-{hexid}", env, remote_dir, ports))


def _ignore_real_env_files(directory: str, names: list[str]) -> set[str]:
    """copytree's filter: no caches, no .git, and none of the real env files the test bed (or
    an operator) left in examples/demo (`.env.<environment>`, any name, e.g. `.env.cluster`):
    only the committed `.env.*.example` templates are copied. The app writes its own env file
    with its own database, so nothing of the checkout's secrets or databases leaks in."""
    return {name for name in names
            if name in ("__pycache__", ".git")
            or (name.startswith(".env.") and not name.endswith(".example"))}


def setup_demo_app(app: DemoApp) -> None:
    """Copy examples/demo (without the test bed's real env files), write the app's env file
    (mode 600) and config, create its database, `git init` and commit."""
    shutil.copytree(DEMO_SRC, app.path, ignore=_ignore_real_env_files)
    app.log_dir.mkdir()
    fd = os.open(app.env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(_env_line(k, v) + "\n" for k, v in app.secrets.items()))
    os.chmod(app.env_file, 0o600)
    app.write_config()
    psql_admin(f"CREATE DATABASE {quote_ident(app.database)} OWNER {quote_ident(app.role)};")
    app.git("init", "--quiet", "-b", "main")
    app.git("config", "user.email", OPERATOR_EMAIL)
    app.git("config", "user.name", "togather e2e")
    app.git("config", "commit.gpgsign", "false")
    app.commit("demo app for an e2e test")


@pytest.fixture
def demo_app_factory(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[Callable[..., DemoApp]]:
    """`make(env="staging")` -> a new DemoApp; every app made is torn down after the test
    (containers, network, databases, remote directory; images are kept). A test marked
    `@pytest.mark.proxy_engine("nginx")` gets that engine in the base config."""
    apps: list[DemoApp] = []

    def make(env: str = "staging") -> DemoApp:
        tmp = tmp_path / f"app{len(apps)}"
        tmp.mkdir()
        app = pin_proxy_engine(request, new_demo_app(tmp, env))
        apps.append(app)  # before any side effect: a half-made app is cleaned up too
        setup_demo_app(app)
        return app

    yield make
    problems = []
    for app in apps:
        problems += app.teardown()
    if problems:
        # Leftovers make later runs flaky: say so loudly (as an error of this test's teardown).
        raise AssertionError("e2e teardown problems: " + "; ".join(problems))


@pytest.fixture
def demo_app(request: pytest.FixtureRequest, demo_app_factory: Callable[..., DemoApp]
             ) -> DemoApp:
    """A fresh DemoApp for `staging` (over SSH), or the environment given by indirect
    parametrization: @pytest.mark.parametrize("demo_app", ["development"], indirect=True)."""
    env = getattr(request, "param", None) or "staging"
    return demo_app_factory(env)


# ---------------------------------------------------------------------------------------------
# re-exported for test modules through fixtures (test modules do not import conftest)


@pytest.fixture
def cli_failure() -> Callable[..., str]:
    """`cli_failure(result, contains=..., code=None)`: see `assert_clean_failure`."""
    return assert_clean_failure


@pytest.fixture
def new_ulid() -> Callable[[], str]:
    return ulid_like


@pytest.fixture
def free_port() -> Callable[[], int]:
    """`free_port()`: a TCP port nothing listens on."""
    return lambda: free_ports(1)[0]



# ---------------------------------------------------------------------------------------------
# a webhook receiver


class WebhookReceiver:
    """A webhook receiver on loopback: keeps every POST body (`raw`, bytes), its JSON
    (`events`), its path and headers (`requests`), and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.raw: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.raw.append(body)
                receiver.requests.append((self.path, dict(self.headers)))
                receiver.events.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[WebhookReceiver]:
    """A WebhookReceiver answering 200, or the status given by indirect parametrization."""
    r = WebhookReceiver(getattr(request, "param", 200))
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------
# the fleet (scripts/testbed-fleet.sh): fleet_app / fleet_app_factory
#
# Three real hosts on this machine, host1..host3: each a network namespace on the bridge tbbr0
# (10.77.0.11-13; the root namespace is 10.77.0.1) with a private /srv, its own dockerd and sshd
# (ssh aliases togather-host1..3, user deploy). HAProxy on 127.0.0.1:10080 spreads requests over
# the hosts' port 80. From here (root, root namespace) a host's /srv is
# /var/lib/togather-fleet/<host>/srv and its daemon is unix:///run/togather-fleet/<host>/docker.sock,
# so the fixtures read state files and list containers directly, like DemoApp does for staging.
#
# `fleet_app_factory(hosts=("host1",), through_lb=False, strategy="remote", env="production")`
# -> a FleetApp (a DemoApp whose environment targets those hosts; the first is the primary,
# which holds the state file and the lock). through_lb=True gives it proxy port 80, the port the
# load balancer forwards to: only one app can own it per host, so such apps hold a machine-wide
# lock (/run/togather-testbed/fleet-port80.lock, bounded wait) for the test's duration and
# require port 80 free on every fleet host. Otherwise the ports are unique (free here and in every
# host's namespace). Skipped when the fleet is down; FAILS under CI=true with TOGATHER_FLEET=1.
# Teardown on every fleet host: compose down, leftover containers/networks of the project, the
# remote directory; the databases. Images stay.

FLEET_HOSTS = ("host1", "host2", "host3")
FLEET_GATEWAY = "10.77.0.1"
FLEET_LB = ("127.0.0.1", 10080)
FLEET_LB_URL = f"http://{FLEET_LB[0]}:{FLEET_LB[1]}"
FLEET_REGISTRY = "registry.togather.test:5000"
FLEET_STATE_ROOT = Path("/var/lib/togather-fleet")
FLEET_SOCK_ROOT = Path("/run/togather-fleet")
FLEET_PORT80_LOCK = Path("/run/togather-testbed/fleet-port80.lock")
FLEET_PORT80_WAIT = 900
FLEET_SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")


def fleet_alias(host: str) -> str:
    """host2 -> togather-host2 (the ssh alias in ~/.ssh/config)."""
    return f"togather-{host}"


def fleet_addr(host: str) -> str:
    """host2 -> 10.77.0.12."""
    return f"10.77.0.{10 + int(host.removeprefix('host'))}"


def fleet_root_path(host: str, path: str | Path) -> Path:
    """Where `path` (under /srv) on fleet `host` is, seen from the root namespace."""
    path = Path(path)
    assert path.is_relative_to("/srv"), f"{path}: only /srv is private per fleet host"
    return FLEET_STATE_ROOT / host / path.relative_to("/")


def fleet_docker(host: str, *args: str, check: bool = True, timeout: float = 120
                 ) -> subprocess.CompletedProcess:
    """`docker ARGS` against fleet `host`'s own daemon (as root, through its socket)."""
    return run(["docker", "-H", f"unix://{FLEET_SOCK_ROOT / host / 'docker.sock'}", *args],
               check=check, timeout=timeout)


def fleet_ssh(host: str, command: str, *, input: str | None = None, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `command` on fleet `host` over SSH as deploy (plain `docker` is the host's daemon).
    Secrets go through `input` (stdin), never into `command`."""
    return run(["ssh", *FLEET_SSH_OPTIONS, fleet_alias(host), command], input=input,
               check=check, timeout=timeout)


def fleet_listening_ports(host: str) -> set[int]:
    """TCP ports something listens on in fleet `host`'s network namespace."""
    out = run(["nsenter", f"--net=/run/netns/{fleet_alias(host)}", "ss", "-Hltn"]).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def http_get(address: str, port: int, path: str = "/", *, timeout: float = 5
             ) -> tuple[int, dict[str, str], str]:
    """GET http://ADDRESS:PORT/PATH on a fresh connection: (status, lower-case headers, body)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return (resp.status, {k.lower(): v for k, v in resp.getheaders()},
                resp.read().decode("utf-8", "replace"))
    finally:
        conn.close()


@functools.cache
def fleet_problems() -> tuple[str, ...]:
    """Everything missing for the fleet tests (empty when the fleet is usable)."""
    # Without the bridge, 10.77.0.x is not on this machine: never send it anything then.
    if not Path("/sys/class/net/tbbr0").exists():
        return ("no bridge tbbr0",)
    problems = []
    for host in FLEET_HOSTS:
        if problem := _probe(["ssh", *FLEET_SSH_OPTIONS, fleet_alias(host), "docker info -f ."],
                             timeout=30):
            problems.append(problem)
    if problem := _probe(["curl", "-sS", "-m", "5", "-o", "/dev/null",
                          f"http://{FLEET_REGISTRY}/v2/"]):
        problems.append(problem)
    env_file = TESTBED_ENV_DIR / ".env.production"
    if not env_file.is_file():
        problems.append(f"{env_file} is missing")
    return tuple(problems)


def require_fleet() -> None:
    """Skip the calling test when the fleet is down; fail it under CI=true + TOGATHER_FLEET=1
    (`.ci/run` sets it: `make test` starts the fleet, so CI must never pass by skipping)."""
    problems = fleet_problems()
    if not problems:
        return
    reason = "the fleet test bed is not up (`make testbed` starts it): " + "; ".join(problems)
    if (os.environ.get("CI", "").lower() == "true"
            and os.environ.get("TOGATHER_FLEET") == "1"):
        pytest.fail("CI=true, TOGATHER_FLEET=1 and " + reason, pytrace=False)
    pytest.skip(reason)


@dataclass
class FleetApp(DemoApp):
    """A DemoApp deployed to fleet hosts (`hosts`, short names; the first is the primary).

    Extra: `aliases`, `primary`, `through_lb`, `ssh(host, cmd)`, `docker(host, ...)`,
    `root_path(host, path)`, `lb_get(path)`, `host_get(host, path)`, `served_by(host)`,
    `served_by_hosts()`, `served_through_lb(n)`, `url(host=None)`, `rollback(...)`. `deploy`
    and `rollback` pass --yes on production. `state()`, `tree()`, `audit_log()`, `snapshots()`,
    `containers(host=None)`, `compose(..., host=None)` look at the primary unless told."""

    hosts: tuple[str, ...] = ("host1",)
    through_lb: bool = False
    port80_lock: Any = None

    @property
    def primary(self) -> str:
        return self.hosts[0]

    @property
    def aliases(self) -> list[str]:
        return [fleet_alias(h) for h in self.hosts]

    @property
    def host(self) -> str:
        return fleet_alias(self.primary)

    def root_path(self, host: str, path: str | Path | None = None) -> Path:
        return fleet_root_path(host, path or self.remote_dir)

    @property
    def state_path(self) -> Path:
        return self.root_path(self.primary) / "deployment-state.json"

    @property
    def snapshot_dir(self) -> Path:
        return self.root_path(self.primary) / "snapshots"

    def state_bytes_on(self, host: str) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return (self.root_path(host) / "deployment-state.json").read_bytes()
        return None

    # --- the CLI ----------------------------------------------------------------------------

    def deploy(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        yes = ("--yes",) if self.env == "production" and "--yes" not in args else ()
        return self.inv("deploy", self.env_flag, *yes, *args, **kwargs)

    def rollback(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        yes = ("--yes",) if self.env == "production" and "--yes" not in args else ()
        return self.inv("rollback", self.env_flag, *yes, *args, **kwargs)

    # --- the hosts --------------------------------------------------------------------------

    def ssh(self, host: str, command: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """`command` on fleet `host` over SSH as deploy (see fleet_ssh)."""
        return fleet_ssh(host, command, **kwargs)

    def docker(self, host: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """`docker ARGS` against `host`'s daemon, as root (see fleet_docker)."""
        return fleet_docker(host, *args, **kwargs)

    def put_state(self, doc: dict[str, Any], host: str | None = None) -> None:
        validate_state(doc, where="the hand-made state")
        path = f"{self.remote_dir}/deployment-state.json"
        self.ssh(host or self.primary,
                 f"mkdir -p {self.remote_dir} && cat > {path}.tmp && mv {path}.tmp {path}",
                 input=json.dumps(doc, indent=2) + "\n")

    def audit_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.root_path(self.primary) / "audit.log").read_text()
        return ""

    def tree(self, host: str | None = None) -> dict[str, tuple[int, int, int]] | None:
        root = self.root_path(host or self.primary)
        if not root.exists():
            return None
        return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size,
                                           p.lstat().st_mtime_ns)
                for p in sorted([root, *root.rglob("*")])}

    def compose_files_exist(self, host: str | None = None) -> bool:
        root = self.root_path(host or self.primary)
        return (root / "compose.yml").is_file() and (root / "slots.env").is_file()

    def compose(self, *args: str, check: bool = False, host: str | None = None
                ) -> subprocess.CompletedProcess:
        """`docker compose -p PROJECT [files] ARGS` on `host` (primary), over SSH as deploy."""
        import shlex

        host = host or self.primary
        root = self.remote_dir
        files = (f"--project-directory {root} -f {root}/compose.yml --env-file {root}/slots.env"
                 if self.compose_files_exist(host) else "")
        words = " ".join(shlex.quote(a) for a in args)
        return self.ssh(host, f"docker compose -p {self.project} {files} {words}", check=check,
                        timeout=180)

    def containers(self, host: str | None = None) -> list[dict[str, str]]:
        out = self.docker(host or self.primary, "ps", "-a", "--no-trunc", "--filter",
                          f"label=com.docker.compose.project={self.project}", "--format",
                          '{{.ID}}\t{{.Label "com.docker.compose.service"}}\t{{.State}}\t'
                          '{{.Image}}').stdout
        rows = [dict(zip(("id", "service", "state", "image"), line.split("\t"), strict=True))
                for line in out.splitlines()]
        return sorted(rows, key=lambda r: r["service"])

    def container_state(self, slot_or_service: str, host: str | None = None) -> str | None:
        service = (f"app-{slot_or_service}" if slot_or_service in ("blue", "green")
                   else slot_or_service)
        states = [c["state"] for c in self.containers(host) if c["service"] == service]
        return states[0] if states else None

    # --- HTTP -------------------------------------------------------------------------------

    def url(self, host: str | None = None) -> str:
        """The load balancer's URL (host None and through_lb), else `host`'s (primary's) proxy
        from the root namespace."""
        if host is None and self.through_lb:
            return FLEET_LB_URL
        return f"http://{fleet_addr(host or self.primary)}:{self.ports['proxy']}"

    def lb_get(self, path: str = "/", timeout: float = 5) -> tuple[int, dict[str, str], str]:
        """GET through the load balancer (127.0.0.1:10080)."""
        return http_get(*FLEET_LB, path, timeout=timeout)

    def host_get(self, host: str, path: str = "/", port: int | None = None,
                 timeout: float = 5) -> tuple[int, dict[str, str], str]:
        """GET http://10.77.0.1N:PORT/PATH (the host's proxy by default)."""
        return http_get(fleet_addr(host), port or self.ports["proxy"], path, timeout=timeout)

    def get(self, path: str, port: int | None = None,
            timeout: float = 5) -> tuple[int, dict[str, str], str]:
        """Through the load balancer when through_lb (and no port), else the primary's proxy."""
        if self.through_lb and port is None:
            return self.lb_get(path, timeout)
        return self.host_get(self.primary, path, port, timeout)

    def served_by(self, host: str) -> tuple[str | None, dict[str, Any]]:
        """(X-Togather-Slot, /version body) as `host`'s own proxy answers."""
        status, headers, body = self.host_get(host, "/version")
        assert status == 200, f"{host}: GET /version -> {status}: {body}"
        return headers.get("x-togather-slot"), json.loads(body)

    def served_by_hosts(self) -> dict[str, tuple[str | None, dict[str, Any]]]:
        """served_by(host) for each of the app's hosts."""
        return {host: self.served_by(host) for host in self.hosts}

    def served_through_lb(self, requests: int = 12) -> list[tuple[int, str | None, str]]:
        """`requests` GET /version through the load balancer (fresh connections, so they spread):
        [(status, X-Togather-Slot, body)]."""
        out = []
        for _ in range(requests):
            status, headers, body = self.lb_get("/version")
            out.append((status, headers.get("x-togather-slot"), body))
        return out

    # --- teardown ---------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], Any]) -> None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever fails
                problems.append(f"{what}: {exc}")

        for running in self.spawned:
            attempt(f"stop process {running.pid}", running.ensure_gone)
        for host in FLEET_HOSTS:  # every host: a test may have widened the environment
            if self.compose_files_exist(host):
                attempt(f"{host}: compose down", functools.partial(
                    self.compose, "down", "--remove-orphans", "--timeout", "2", check=True,
                    host=host))

            def remove_leftovers(host: str = host) -> None:
                ids = [c["id"] for c in self.containers(host)]
                if ids:
                    self.docker(host, "rm", "-f", *ids)
                networks = self.docker(host, "network", "ls", "-q", "--filter",
                                       f"label=com.docker.compose.project={self.project}"
                                       ).stdout.split()
                for network in networks:
                    self.docker(host, "network", "rm", network, check=False)

            attempt(f"{host}: remove containers", remove_leftovers)
            top = self.root_path(host, Path(self.remote_dir).parent)
            attempt(f"{host}: remove remote dir",
                    lambda top=top: shutil.rmtree(top) if top.exists() else None)
        for name in [self.database, *self.scratch_databases]:
            attempt(f"drop database {name}", functools.partial(drop_database, name))
        if self.port80_lock is not None:
            self.port80_lock.close()
            self.port80_lock = None
        return problems


def _acquire_port80(hexid: str) -> Any:
    """The machine-wide lock of the fleet hosts' port 80 (bounded wait), then port 80 must be
    free on every fleet host (whatever holds it would answer through the load balancer)."""
    import fcntl

    FLEET_PORT80_LOCK.parent.mkdir(parents=True, exist_ok=True)
    handle = open(FLEET_PORT80_LOCK, "a+")  # noqa: SIM115 - held until teardown
    deadline = time.monotonic() + FLEET_PORT80_WAIT
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise AssertionError(f"{FLEET_PORT80_LOCK} still held after "
                                     f"{FLEET_PORT80_WAIT} s (another through_lb fleet test)"
                                     ) from None
            time.sleep(1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} e2e-{hexid}\n")
    handle.flush()
    busy = [h for h in FLEET_HOSTS if 80 in fleet_listening_ports(h)]
    if busy:
        handle.close()
        raise AssertionError(f"port 80 is in use on {', '.join(busy)} (a fleet deploy left "
                             "running, e.g. examples/demo's production? `docker ps` over ssh "
                             "togather-hostN shows it)")
    return handle


def new_fleet_app(tmp: Path, hosts: tuple[str, ...], *, through_lb: bool, strategy: str,
                  env: str) -> FleetApp:
    """A FleetApp in `tmp`, not set up yet (the port-80 lock, when through_lb, is taken here:
    register the app for teardown at once)."""
    assert hosts and set(hosts) <= set(FLEET_HOSTS), hosts
    hexid = secrets.token_hex(4)
    used = set().union(*(fleet_listening_ports(h) for h in FLEET_HOSTS))
    if through_lb:
        ports = {"proxy": 80, **dict(zip(("blue", "green"), free_ports(2, exclude=used | {80}),
                                         strict=True))}
    else:
        ports = dict(zip(("proxy", "blue", "green"), free_ports(3, exclude=used), strict=True))
    remote_dir = f"{REMOTE_BASE}/e2e-{hexid}/{env}"
    testbed = _testbed_secrets("production")  # role togather_production, PostgreSQL at 10.77.0.1
    database = f"e2e_{hexid}"
    role = unquote(urlsplit(testbed["DATABASE_URL"]).username or "")
    assert role, "the test bed's .env.production names no role"
    secrets_ = {**testbed, "ENVIRONMENT": env}
    for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
        if secrets_.get(key):
            secrets_[key] = _with_database(secrets_[key], database)
    aliases = [fleet_alias(h) for h in hosts]
    config = _base_config(f"e2e-{hexid}", "staging", remote_dir, ports)
    config["environments"] = {env: {
        "hosts": aliases,
        "remote_dir": remote_dir,
        "ports": dict(ports),
        "public_url": FLEET_LB_URL if through_lb else f"http://{fleet_addr(hosts[0])}:"
                                                      f"{ports['proxy']}",
    }}
    config["proxy"] = {**config.get("proxy", {}), "bind": "0.0.0.0"}
    config["build"] = {**config.get("build", {}), "strategy": strategy}
    if strategy == "registry":
        config["build"]["registry"] = f"{FLEET_REGISTRY}/e2e-{hexid}"
    app = FleetApp(path=tmp / "repo", env=env, hex=hexid, ports=ports, remote_dir=remote_dir,
                   database=database, role=role, secrets=secrets_, log_dir=tmp / "logs",
                   tmp=tmp, base_config=config, hosts=tuple(hosts), through_lb=through_lb)
    return app


@pytest.fixture
def fleet_app_factory(request: pytest.FixtureRequest, tmp_path: Path
                      ) -> Iterator[Callable[..., FleetApp]]:
    """`make(hosts=("host1",), through_lb=False, strategy="remote", env="production")` -> a new
    FleetApp (see its docstring); every app made is torn down on every fleet host afterwards."""
    require_fleet()
    apps: list[FleetApp] = []

    def make(hosts: tuple[str, ...] | list[str] = ("host1",), *, through_lb: bool = False,
             strategy: str = "remote", env: str = "production") -> FleetApp:
        tmp = tmp_path / f"fleet{len(apps)}"
        tmp.mkdir()
        app = pin_proxy_engine(request, new_fleet_app(
            tmp, tuple(hosts), through_lb=through_lb, strategy=strategy, env=env))
        apps.append(app)  # before any side effect: a half-made app is cleaned up too
        if through_lb:
            app.port80_lock = _acquire_port80(app.hex)
        setup_demo_app(app)
        return app

    yield make
    problems = []
    for app in apps:
        problems += app.teardown()
    if problems:
        raise AssertionError("fleet e2e teardown problems: " + "; ".join(problems))


@pytest.fixture
def fleet_app(request: pytest.FixtureRequest, fleet_app_factory: Callable[..., FleetApp]
              ) -> FleetApp:
    """A FleetApp on host1 alone with unique ports, or the factory's keyword arguments given by
    indirect parametrization:
        @pytest.mark.parametrize("fleet_app", [{"hosts": FLEET_HOSTS, "through_lb": True}],
                                 indirect=True)"""
    return fleet_app_factory(**(getattr(request, "param", None) or {}))
