"""Configuration: `config/deployment.yml` (validated against the package's JSON Schema) merged
with the per-environment overrides, plus the secrets file `config/environments/.env.<env>`.

Everything here is checked before any change anywhere; every problem found is reported at once
(exit 10) with the file, the key and the fix.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import posixpath
import stat
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import jsonschema
import yaml
from dotenv.main import DotEnv
from dotenv.parser import parse_stream

from .errors import ConfigError, UsageError
from .redact import Redactor, is_secret_key

ENVIRONMENTS = ("development", "staging", "production")
NON_SECRET_KEYS = frozenset({"ENVIRONMENT"})
REQUIRED_SECRETS = ("ENVIRONMENT", "DATABASE_URL", "JWT_SECRET", "ADMIN_API_KEY")
PLACEHOLDER = "CHANGE_ME"
MIN_SECRET_CHARS = 8
SCHEMA_DIR = Path(__file__).parent / "schemas"
CONFIG_FILE = Path("config") / "deployment.yml"
ENV_DIR = Path("config") / "environments"

# Every default in one place; deployment.yml and its per-environment overrides are merged on top.
DEFAULTS: dict[str, Any] = {
    "app": {
        "image": "togather-server",
        "port": 8080,
        "health_endpoint": "/health",
        "version_endpoint": "/version",
    },
    "build": {"context": ".", "dockerfile": "Dockerfile", "strategy": "remote", "args": {},
              "timeout": 1800},
    "database": {
        "migration_tool": "dbmate",
        "migrations_path": "db/migrations",
        "migration_command": "",
        "migration_timeout": 300,
        "snapshot_dir": "snapshots",
        "snapshot_retention_days": 7,
        "snapshot_keep": 10,
        "snapshot": "when-migrating",
    },
    "deployment": {
        "health_check": {"retries": 30, "interval": 2, "timeout": 5, "startup_grace": 1,
                         "deadline": 60},
        "drain_seconds": 5,
        "stop_timeout": 30,
        "lock_timeout_minutes": 30,
        "history_limit": 20,
        "require_healthy": False,
        "keep_images": 5,
        # Hosts worked on at once (build, start, health, switch); None: all of them.
        "parallel": None,
    },
    "proxy": {"bind": "0.0.0.0", "verify_attempts": 20},  # noqa: S104 - the public entry point
    "notifications": {"retries": 3, "timeout": 5},
}
ENVIRONMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "development": {"hosts": ["local"], "ports": {"proxy": 8080, "blue": 8081, "green": 8082}},
    "staging": {"ports": {"proxy": 8080, "blue": 8081, "green": 8082}},
    "production": {"ports": {"proxy": 80, "blue": 8081, "green": 8082}},
}
OVERRIDABLE_SECTIONS = ("build", "database", "deployment", "proxy", "notifications")


@dataclass(frozen=True)
class HealthCheckSettings:
    retries: int
    interval: float
    timeout: float
    startup_grace: float
    deadline: float  # the whole gate, whatever the retries: a hanging endpoint cannot hold it


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know about one environment, resolved and validated."""

    root: Path
    env: str
    app_name: str
    image: str
    app_port: int
    health_endpoint: str
    version_endpoint: str
    hosts: tuple[str, ...]
    remote_dir: str
    ports: dict[str, int]
    public_url: str
    build: dict[str, Any]
    database: dict[str, Any]
    deployment: dict[str, Any]
    proxy: dict[str, Any]
    notifications: dict[str, Any]
    env_file: Path
    secrets: dict[str, str] = field(repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def primary_host(self) -> str:
        """The host that keeps the state file, the lock and the database snapshots."""
        return self.hosts[0]

    @property
    def health(self) -> HealthCheckSettings:
        return HealthCheckSettings(**self.deployment["health_check"])

    @property
    def compose_project(self) -> str:
        return f"{self.app_name}-{self.env}"

    @property
    def state_path(self) -> str:
        return f"{self.remote_dir}/deployment-state.json"

    @property
    def snapshot_dir(self) -> str:
        return str(PurePosixPath(self.remote_dir, self.database["snapshot_dir"]))

    @property
    def migrate_database_url(self) -> str:
        """The database as the host sees it (pg_dump, migrations); the app may see another
        address (a container reaching the host through the bridge gateway)."""
        return self.secrets.get("DEPLOY_DATABASE_URL") or self.secrets["DATABASE_URL"]

    def secret_values(self) -> list[str]:
        """Values redacted wherever they appear: everything in the env file except the few
        keys that are known not to be secret (the environment's own name)."""
        return [v for k, v in self.secrets.items() if v and k not in NON_SECRET_KEYS]

    def redactor(self) -> Redactor:
        return Redactor(self.secret_values())

    def public_dict(self) -> dict[str, Any]:
        """The merged configuration for `config.show`; secrets are added redacted by the caller."""
        return {
            "environment": self.env,
            "app": {"name": self.app_name, "image": self.image, "port": self.app_port,
                    "health_endpoint": self.health_endpoint,
                    "version_endpoint": self.version_endpoint},
            "hosts": list(self.hosts),
            "remote_dir": self.remote_dir,
            "ports": self.ports,
            "public_url": self.public_url,
            "build": self.build,
            "database": self.database,
            "deployment": self.deployment,
            "proxy": self.proxy,
            "notifications": self.notifications,
            "env_file": str(self.env_file),
        }


@cache
def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text())


def check_env_name(env: str | None) -> str:
    if not env:
        raise UsageError("--env is required: one of " + ", ".join(ENVIRONMENTS),
                         hint="Example: inv deploy --env=staging")
    if env not in ENVIRONMENTS:
        raise UsageError(f"unknown environment {env!r}: expected one of " + ", ".join(ENVIRONMENTS))
    return env


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def schema_problems(document: Any, where: str) -> list[str]:
    """Every schema violation of deployment.yml as `file: key.path: what is wrong`."""
    validator = jsonschema.Draft202012Validator(
        _schema("deployment-config.schema.json"),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        if error.validator == "additionalProperties":
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            message = "unknown key(s) " + ", ".join(repr(k) for k in unknown)
            message += "; allowed: " + ", ".join(sorted(error.schema.get("properties", {})))
        else:
            message = error.message
        problems.append(f"{where}: {path}: {message}")
    return problems


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found",
                          hint="Create it (see the README's adoption walkthrough).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def read_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """Parse a .env file with python-dotenv without touching os.environ.

    Returns the variables and the problems found (unparsable lines), so they can be reported
    together with every other problem.
    """
    problems: list[str] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return {}, [f"{path}: not valid UTF-8"]
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            line = binding.original.line
            problems.append(f"{path}: line {line}: cannot parse this line "
                            "(expected NAME=VALUE; quote values with spaces or #)")
    # interpolate=False: a `$` in a secret is data, not a reference to another variable.
    dotenv_logger = logging.getLogger("dotenv.main")
    previous = dotenv_logger.disabled
    dotenv_logger.disabled = True  # its warnings would repeat the problems above, unredacted
    try:
        values = DotEnv(path, interpolate=False, encoding="utf-8").dict()
    finally:
        dotenv_logger.disabled = previous
    return {k: (v if v is not None else "") for k, v in values.items()}, problems


def secrets_problems(env: str, path: Path, values: dict[str, str]) -> list[str]:
    problems = []
    for key in REQUIRED_SECRETS:
        if not values.get(key):
            problems.append(f"{path}: {key} is missing or empty (required)")
    for key, value in values.items():
        if PLACEHOLDER in value:
            problems.append(f"{path}: {key} still holds the {PLACEHOLDER} placeholder: "
                            "set the real value")
    if values.get("ENVIRONMENT") and values["ENVIRONMENT"] != env:
        problems.append(f"{path}: ENVIRONMENT={values['ENVIRONMENT']!r} but --env={env}: "
                        "this file belongs to another environment")
    bad_urls = set()
    for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
        if values.get(key) and PLACEHOLDER not in values[key]:
            problem = database_url_problem(values[key])
            if problem:
                bad_urls.add(key)
                problems.append(f"{path}: {key}: {problem}")
    problems += [f"{path}: {key} is too short for a secret (fewer than {MIN_SECRET_CHARS} "
                 "characters: guessable, and not reliably redacted): use a long random value"
                 for key, value in values.items()
                 if key not in bad_urls and _too_short_secret(key, value)]
    return problems


def _too_short_secret(key: str, value: str) -> bool:
    """A secret-named variable (or a URL's password) of a few characters: guessable, and masked
    by value it would also mask every common word it happens to equal."""
    if not value or PLACEHOLDER in value or not is_secret_key(key):
        return False
    if "://" in value:
        try:
            password = urlsplit(value).password
        except ValueError:
            return False
        return password is not None and 0 < len(unquote(password)) < MIN_SECRET_CHARS
    return len(value) < MIN_SECRET_CHARS


def database_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("postgres", "postgresql"):
        return "must start with postgres:// or postgresql://"
    if not parts.hostname or not parts.username or not parts.path.strip("/"):
        return "must name a user, a host and a database (postgres://USER:PASSWORD@HOST/DB)"
    return None


def env_file_mode_problem(path: Path) -> str | None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return (f"{path}: mode {mode:03o} lets group or others read secrets: "
                f"run `chmod 600 {path}`")
    return None


def find_project_root(start: Path) -> Path:
    for candidate in (start, *start.parents):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return start


def _merge_environment(document: dict[str, Any], env: str, config_path: Path,
                       ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The environment's block and the merged sections, with the rules a schema cannot say."""
    problems: list[str] = []
    env_block = (document.get("environments") or {}).get(env)
    if env_block is None and env != "development":
        problems.append(f"{config_path}: environments.{env} is not defined: add an "
                        f"`environments: {env}:` block with its hosts")
    env_block = deep_merge(ENVIRONMENT_DEFAULTS[env], env_block or {})
    merged = deep_merge(DEFAULTS, {k: v for k, v in document.items() if k != "environments"})
    for section in OVERRIDABLE_SECTIONS:
        if section in env_block:
            merged[section] = deep_merge(merged[section], env_block[section])
    if "hosts" not in env_block and not problems:
        problems.append(f"{config_path}: environments.{env}.hosts is required")
    ports = env_block["ports"]
    if len(set(ports.values())) != len(ports):
        problems.append(f"{config_path}: environments.{env}.ports: proxy, blue and green "
                        "must be three different ports")
    database = merged["database"]
    if database["migration_tool"] == "custom" and not database["migration_command"].strip():
        problems.append(f"{config_path}: database.migration_command is required when "
                        "migration_tool is custom")
    build = merged["build"]
    if build["strategy"] == "registry" and not build.get("registry"):
        problems.append(f"{config_path}: build.registry is required when strategy is registry")
    for key in ("context", "dockerfile"):
        if ".." in PurePosixPath(build[key]).parts or build[key].startswith("/"):
            problems.append(f"{config_path}: build.{key} must be a path inside the repository")
    problems += [f"{config_path}: {problem}" for problem in directory_problems(
        f"environments.{env}.remote_dir", _remote_dir(env_block, env), database["snapshot_dir"])]
    return env_block, merged, problems


def directory_problems(where: str, remote_dir: str, snapshot_dir: str) -> list[str]:
    """The deploy writes, prunes and `rm -rf`s under these directories: they must name one
    place of their own, never the root, never a way out through `..`."""
    problems = []
    remote = PurePosixPath(remote_dir)
    if ".." in remote.parts:
        problems.append(f"{where}: must not contain `..`")
    elif posixpath.normpath(remote_dir).strip("/") in ("", "."):
        problems.append(f"{where}: must not be the root directory `/`")
    snapshots = PurePosixPath(snapshot_dir)
    if ".." in snapshots.parts:
        problems.append("database.snapshot_dir: must not contain `..`")
    elif snapshots.is_absolute() and not _strictly_inside(snapshots, remote):
        problems.append(f"database.snapshot_dir: {snapshot_dir} is outside the remote "
                        f"directory {remote_dir}: give a path relative to it (e.g. snapshots)")
    return problems


def _strictly_inside(path: PurePosixPath, directory: PurePosixPath) -> bool:
    inner, outer = (PurePosixPath(posixpath.normpath(p)) for p in (path, directory))
    return inner != outer and inner.is_relative_to(outer)


def _remote_dir(env_block: dict[str, Any], env: str) -> str:
    return env_block.get("remote_dir", f"/srv/togather/{env}")


def load_settings(env: str, root: Path, *, require_secrets: bool = True) -> Settings:
    """Load, merge and validate the configuration of one environment (exit 10 on problems)."""
    env = check_env_name(env)
    config_path = root / CONFIG_FILE
    document = load_yaml(config_path)
    if not isinstance(document, dict):
        raise ConfigError(f"{config_path}: expected a mapping at the top level")
    problems = schema_problems(document, str(config_path))
    env_block: dict[str, Any] = {}
    merged: dict[str, Any] = {}
    if not problems:
        # Cross-field rules need a schema-valid document; the secrets file is checked either
        # way, so every problem is reported in one go.
        env_block, merged, more = _merge_environment(document, env, config_path)
        problems += more

    env_file = root / ENV_DIR / f".env.{env}"
    secrets: dict[str, str] = {}
    warnings: list[str] = []
    if require_secrets:
        if not env_file.is_file():
            example = env_file.with_name(env_file.name + ".example")
            fix = (f"copy {example} to {env_file}, fill in the values and `chmod 600` it"
                   if example.is_file() else f"create {env_file} (mode 600)")
            problems.append(f"{env_file}: secrets file not found: {fix}")
        else:
            mode_problem = env_file_mode_problem(env_file)
            if mode_problem and env == "development":
                warnings.append(mode_problem)
            elif mode_problem:
                problems.append(mode_problem)
            secrets, parse_problems = read_env_file(env_file)
            problems += parse_problems
            problems += secrets_problems(env, env_file, secrets)
    if problems:
        # Problems may quote values from the env file: redact before they reach the terminal.
        redactor = Redactor(v for k, v in secrets.items()
                            if v and k not in NON_SECRET_KEYS and PLACEHOLDER not in v)
        raise ConfigError([redactor(p) for p in problems])

    app = merged["app"]
    ports = env_block["ports"]
    return Settings(
        root=root,
        env=env,
        app_name=app["name"],
        image=app["image"],
        app_port=app["port"],
        health_endpoint=app["health_endpoint"],
        version_endpoint=app["version_endpoint"],
        hosts=tuple(env_block["hosts"]),
        remote_dir=_remote_dir(env_block, env),
        ports=dict(ports),
        public_url=env_block.get("public_url", f"http://127.0.0.1:{ports['proxy']}"),
        build=merged["build"],
        database=merged["database"],
        deployment=merged["deployment"],
        proxy=merged["proxy"],
        notifications=merged["notifications"],
        env_file=env_file,
        secrets=secrets,
        warnings=tuple(warnings),
    )


def database_parts(url: str) -> dict[str, str]:
    """host, port, user, password, dbname and query of a postgres URL (values unquoted; a
    password may also come as the `password` query parameter)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return {
        "host": parts.hostname or "localhost",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or "") or query.get("password", ""),
        "dbname": unquote(parts.path.lstrip("/")),
        "query": parts.query,
    }


def app_environment(secrets: dict[str, str]) -> dict[str, str]:
    """Variables handed to the app containers: the env file minus what only the deploy uses."""
    return {k: v for k, v in secrets.items() if not k.startswith("DEPLOY_")}

