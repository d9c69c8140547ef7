"""Configuration: `config/deployment.yml` (validated against the package's JSON Schema) merged
with the per-environment overrides, plus the secrets file `config/environments/.env.<env>`.

Everything here is checked before any change anywhere; every problem found is reported at once
(exit 10) with the file, the key and the fix.
"""

from __future__ import annotations

import copy
import io
import ipaddress
import json
import logging
import posixpath
import re
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

from . import edge
from . import tls as tls_config
from .errors import ConfigError, UsageError
from .redact import Redactor, is_secret_key

# An environment's name goes into file names (.env.<env>, snapshots, logs), the remote
# directory, the Compose project and the state file: letters, digits and dashes only, and no
# `x-` prefix (those keys are YAML-anchor scratch space, dropped before validation).
ENV_NAME_RE = re.compile(r"^(?!x-)[a-z][a-z0-9-]{0,30}$")
NON_SECRET_KEYS = frozenset({"ENVIRONMENT"})
# Togather's own secrets: the default of `app.required_secrets`. ENVIRONMENT is always
# required, whatever the app: it proves the file belongs to --env.
REQUIRED_SECRETS = ("ENVIRONMENT", "DATABASE_URL", "JWT_SECRET", "ADMIN_API_KEY")
# `x-` keys exist for YAML anchors (`x-common: &common ...`); like Compose, they are ignored.
EXTENSION_PREFIX = "x-"
# Migration tools that run on the host against DATABASE_URL (`command` runs in the app's image
# with the app's own environment; `none` runs nothing).
HOST_MIGRATION_TOOLS = ("dbmate", "golang-migrate", "custom")
PLACEHOLDER = "CHANGE_ME"
# The registry strategy's `docker login`; DEPLOY_ keeps them out of the app's containers.
REGISTRY_USERNAME = "DEPLOY_REGISTRY_USERNAME"
REGISTRY_PASSWORD = "DEPLOY_REGISTRY_PASSWORD"  # noqa: S105 - a variable's name
# The Grafana API token (monitoring.grafana_url); DEPLOY_ keeps it out of the app's containers.
GRAFANA_TOKEN = "DEPLOY_GRAFANA_TOKEN"  # noqa: S105 - a variable's name
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
        "health": {"mode": "contract"},
        "required_secrets": list(REQUIRED_SECRETS[1:]),
    },
    "build": {"context": ".", "dockerfile": "Dockerfile", "strategy": "remote", "args": {},
              "timeout": 1800, "registry_build": "local"},
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
        # Docker's json-file driver keeps a container's log forever by default: a chatty app
        # fills the host's disk. Rotation bounds each container's log files.
        "log_rotation": {"max_size": "10m", "max_files": 5},
        # Hosts worked on at once (build, start, health, switch); None: all of them.
        "parallel": None,
        # Deploy in waves of `batch` hosts ({"batch": N}), each switched and gated through its
        # hosts' proxies before the next starts; None: all hosts switch together (all or none).
        "rolling": None,
    },
    # keepalive: idle upstream connections per nginx worker and slot (site.conf). At least the
    # requests in flight per worker at peak: each request beyond the pool closes its upstream
    # connection afterwards, and ~470 closes a second fill the ephemeral ports with TIME_WAIT
    # (32 collapsed to 1,206 req/s at 128 connections; README "Sustained throughput").
    # max_body_size: the largest request body the proxy passes (nginx's size: 0 = no limit;
    # nginx's own default of 1m refuses uploads an app accepts direct). read_timeout: seconds
    # the proxy waits between two reads of the app's answer before a 504.
    # engine: haproxy (the default: the one that met the HTTPS throughput goal on a small host)
    # or nginx; the same files on the host and the same features (README "The proxy engines").
    "proxy": {"bind": "0.0.0.0", "verify_attempts": 20,  # noqa: S104 - the public entry point
              "keepalive": 1024, "max_body_size": "100m", "read_timeout": 60,
              "engine": "haproxy"},
    "notifications": {"retries": 3, "timeout": 5},
    # Off unless configured: node exporter's textfile directory is not on every host, and the
    # deploy user needs write access to it (see the README's Monitoring section).
    "monitoring": {},
}
ENVIRONMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "development": {"hosts": ["local"], "ports": {"proxy": 8080, "blue": 8081, "green": 8082}},
    "staging": {"ports": {"proxy": 8080, "blue": 8081, "green": 8082}},
    "production": {"ports": {"proxy": 80, "blue": 8081, "green": 8082}, "confirm": True},
}
# Any other name (qa, eu-prod, preview-42) starts like staging: no confirmation, the slot ports.
OTHER_ENVIRONMENT_DEFAULTS = ENVIRONMENT_DEFAULTS["staging"]
# The HTTPS port when proxy.tls is on and ports.https is not given.
DEFAULT_HTTPS_PORT = 443
# proxy.max_body_size as nginx reads a size (client_max_body_size).
BODY_SIZE = re.compile(r"0|[1-9][0-9]{0,11}[kmgKMG]?")
OVERRIDABLE_SECTIONS = ("build", "database", "deployment", "proxy", "notifications",
                        "monitoring")


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
    version_endpoint: str | None  # None: an `http`-mode app without one (no version check)
    health_mode: str  # contract (Togather's /health body) | http (any 2xx)
    source_root: Path  # the git work tree whose commits are built (app.source)
    confirm: bool  # deploy, rollback and restore ask first (production by default)
    hosts: tuple[str, ...]
    remote_dir: str
    ports: dict[str, int]
    public_url: str
    build: dict[str, Any]
    database: dict[str, Any]
    deployment: dict[str, Any]
    proxy: dict[str, Any]
    notifications: dict[str, Any]
    monitoring: dict[str, Any]
    env_file: Path
    secrets: dict[str, str] = field(repr=False)
    warnings: tuple[str, ...] = ()
    source_url: str | None = None  # app.source when it is a git URL (source.refresh)
    tls: tls_config.TlsSettings | None = None  # proxy.tls: HTTPS at the edge (tls.py)
    engine: str = "compose"  # compose (slots behind nginx per host) | swarm (a Swarm service)

    @property
    def primary_host(self) -> str:
        """The host that keeps the state file, the lock and the database snapshots."""
        return self.hosts[0]

    @property
    def health(self) -> HealthCheckSettings:
        return HealthCheckSettings(**self.deployment["health_check"])

    @property
    def edge_subnet(self) -> ipaddress.IPv4Network:
        """The slots' private network with the proxy (edge.py): proxy.subnet, or derived from
        the blue port."""
        return edge.subnet(self.proxy.get("subnet"), self.ports["blue"])

    def edge_address(self, slot: str) -> str:
        return edge.slot_address(self.edge_subnet, slot)

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
    def has_database(self) -> bool:
        """A PostgreSQL database the tool snapshots: an app may have none (no DATABASE_URL)."""
        return bool(self.secrets.get("DEPLOY_DATABASE_URL") or self.secrets.get("DATABASE_URL"))

    @property
    def migrates_on_host(self) -> bool:
        """The migration tool runs on the primary host over the release's migrations folder
        (`command` runs inside the image, `none` runs nothing)."""
        return self.database["migration_tool"] in HOST_MIGRATION_TOOLS

    @property
    def migrate_database_url(self) -> str:
        """The database as the host sees it (pg_dump, migrations); the app may see another
        address (a container reaching the host through the bridge gateway)."""
        if not self.has_database:
            raise ConfigError(f"{self.env_file}: no DATABASE_URL: this app has no database to "
                              "snapshot, restore or migrate from the host")
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
                    "version_endpoint": self.version_endpoint,
                    "health_mode": self.health_mode, "source": str(self.source_root)},
            "hosts": list(self.hosts),
            "remote_dir": self.remote_dir,
            "ports": self.ports,
            "public_url": self.public_url,
            "confirm": self.confirm,
            "build": self.build,
            "database": self.database,
            "deployment": self.deployment,
            "proxy": self.proxy,
            "notifications": self.notifications,
            "monitoring": self.monitoring,
            "env_file": str(self.env_file),
            "engine": self.engine,
        }


@cache
def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text())


def check_env_name(env: str | None) -> str:
    if not env:
        raise UsageError("--env is required: an environment of config/deployment.yml",
                         hint="Example: inv deploy --env=staging")
    if not ENV_NAME_RE.match(env):
        raise UsageError(f"--env {env!r} is not a valid environment name: lowercase "
                         "letters, digits and dashes, starting with a letter, at most 31 "
                         "characters, not starting with x-",
                         hint="Examples: staging, qa, eu-prod, preview-42")
    return env


def without_extensions(document: Any) -> Any:
    """The document without its `x-` keys, at every level: they hold YAML anchors for reuse
    elsewhere in the file and mean nothing themselves (as in Compose files)."""
    if isinstance(document, dict):
        return {k: without_extensions(v) for k, v in document.items()
                if not (isinstance(k, str) and k.startswith(EXTENSION_PREFIX))}
    if isinstance(document, list):
        return [without_extensions(v) for v in document]
    return document


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


def secrets_problems(env: str, path: Path, values: dict[str, str],
                     required: tuple[str, ...] = REQUIRED_SECRETS) -> list[str]:
    problems = []
    for key in dict.fromkeys(("ENVIRONMENT", *required)):
        if not values.get(key):
            problems.append(f"{path}: {key} is missing or empty (required)")
    for key, value in values.items():
        if PLACEHOLDER in value:
            problems.append(f"{path}: {key} still holds the {PLACEHOLDER} placeholder: "
                            "set the real value")
    if values.get("ENVIRONMENT") and values["ENVIRONMENT"] != env:
        problems.append(f"{path}: ENVIRONMENT={values['ENVIRONMENT']!r} but --env={env}: "
                        "this file belongs to another environment")
    if bool(values.get(REGISTRY_USERNAME)) != bool(values.get(REGISTRY_PASSWORD)):
        problems.append(f"{path}: {REGISTRY_USERNAME} and {REGISTRY_PASSWORD} go together: "
                        "set both (a registry that needs a login) or neither")
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
    defined = document.get("environments") or {}
    env_block = defined.get(env)
    if env_block is None and env != "development":
        problems.append(f"{config_path}: environments.{env} is not defined (defined: "
                        f"{', '.join(defined) or 'none'}): fix --env or add an "
                        f"`environments: {env}:` block with its hosts")
    env_block = deep_merge(ENVIRONMENT_DEFAULTS.get(env, OTHER_ENVIRONMENT_DEFAULTS),
                           env_block or {})
    merged = deep_merge(DEFAULTS, {k: v for k, v in document.items() if k != "environments"})
    for section in OVERRIDABLE_SECTIONS:
        if section in env_block:
            merged[section] = deep_merge(merged[section], env_block[section])
    if "hosts" not in env_block and not problems:
        problems.append(f"{config_path}: environments.{env}.hosts is required")
    ports = env_block["ports"]
    if len({ports[k] for k in ("proxy", "blue", "green")}) != 3:
        problems.append(f"{config_path}: environments.{env}.ports: proxy, blue and green "
                        "must be three different ports")
    database = merged["database"]
    if database["migration_tool"] in ("custom", "command") \
            and not database["migration_command"].strip():
        problems.append(f"{config_path}: database.migration_command is required when "
                        f"migration_tool is {database['migration_tool']}")
    problems += [f"{config_path}: {problem}" for problem in app_problems(merged["app"])]
    build = merged["build"]
    if build["strategy"] == "registry" and not build.get("registry"):
        problems.append(f"{config_path}: build.registry is required when strategy is registry")
    if env_block.get("engine") == "swarm" and build["strategy"] != "registry":
        problems.append(f"{config_path}: environments.{env}: engine swarm needs build.strategy "
                        f"registry (every node pulls the image by digest), not "
                        f"{build['strategy']}")
    for key in ("context", "dockerfile"):
        if ".." in PurePosixPath(build[key]).parts or build[key].startswith("/"):
            problems.append(f"{config_path}: build.{key} must be a path inside the repository")
    problems += [f"{config_path}: {problem}" for problem in directory_problems(
        f"environments.{env}.remote_dir", _remote_dir(env_block, env), database["snapshot_dir"])]
    if "subnet" in merged["proxy"] and (why := edge.subnet_problem(merged["proxy"]["subnet"])):
        problems.append(f"{config_path}: proxy.subnet: {why}")
    if not BODY_SIZE.fullmatch(str(merged["proxy"]["max_body_size"])):
        problems.append(f"{config_path}: proxy.max_body_size: "
                        f"{merged['proxy']['max_body_size']!r} is not a size: a number of "
                        "bytes, or of k, m or g (100m, 1g), or 0 for no limit")
    if merged["proxy"].get("tls"):
        ports.setdefault("https", DEFAULT_HTTPS_PORT)
        if len(set(ports.values())) != len(ports):
            problems.append(f"{config_path}: environments.{env}.ports: https must differ from "
                            "the proxy, blue and green ports")
        problems += [f"{config_path}: {problem}" for problem in tls_config.problems(
            merged["proxy"]["tls"], config_path.parent.parent, "proxy.tls")]
        if env_block.get("engine", "compose") == "compose":
            problems += [f"{config_path}: {problem}" for problem in tls_config.fleet_problems(
                merged["proxy"]["tls"], tuple(env_block.get("hosts") or ()),
                merged["proxy"]["bind"], "proxy.tls")]
    return env_block, merged, problems


def app_problems(app: dict[str, Any]) -> list[str]:
    problems = []
    if app["health"]["mode"] == "contract" and app.get("version_endpoint", "") is None:
        problems.append("app.version_endpoint: the contract health mode verifies the switch "
                        "through the version endpoint: give one (e.g. /version) or use "
                        "app.health.mode: http")
    source = app.get("source")
    if source and not is_git_url(source) and (source.startswith("/") or ".." in
                                              PurePosixPath(source).parts):
        problems.append(f"app.source: {source} must be a path inside this repository "
                        "(relative to it) or a git URL")
    return problems


def is_git_url(source: str) -> bool:
    """`https://...`, `ssh://...`, `file://...` or scp-like `git@host:path`."""
    return "://" in source or bool(re.match(r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:", source))


def database_problems(database: dict[str, Any], env_file: Path, secrets: dict[str, str],
                      required: tuple[str, ...]) -> list[str]:
    """Host-side migration tools and snapshots need the database's URL; an app without a
    database says `migration_tool: none` (or `command`) and leaves DATABASE_URL out."""
    tool = database["migration_tool"]
    if tool in HOST_MIGRATION_TOOLS and not secrets.get("DATABASE_URL") \
            and "DATABASE_URL" not in required:  # else already reported as missing
        return [f"{env_file}: DATABASE_URL is required with database.migration_tool {tool} "
                "(for an app without a database use migration_tool: none)"]
    return []


def monitoring_problems(monitoring: dict[str, Any], env_file: Path,
                        secrets: dict[str, str]) -> list[str]:
    """Grafana refuses an annotation without a token: say so before the deploy, not after."""
    if monitoring.get("grafana_url") and not secrets.get(GRAFANA_TOKEN):
        return [f"{env_file}: {GRAFANA_TOKEN} is required with monitoring.grafana_url (a "
                "Grafana service account token with the annotations:write permission)"]
    return []


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


USUAL_ENVIRONMENTS = ("development", "staging", "production")


def check_env_defined(env: str, document: dict[str, Any]) -> None:
    """An --env the configuration does not define is a wrong argument (exit 2), most often a
    typo: say only that, not the missing secrets file that follows from it. The three usual
    names are the exception: a config without one of them is incomplete (exit 10, reported
    with every other problem)."""
    defined = document.get("environments")
    if env in USUAL_ENVIRONMENTS or not isinstance(defined, dict) or env in defined:
        return
    raise UsageError(f"unknown environment {env!r}: config/deployment.yml defines "
                     f"{', '.join(map(str, defined)) or 'none'}",
                     hint=f"Fix --env, or add an `environments: {env}:` block with its hosts.")


def load_settings(env: str, root: Path, *, require_secrets: bool = True) -> Settings:
    """Load, merge and validate the configuration of one environment (exit 10 on problems)."""
    env = check_env_name(env)
    config_path = root / CONFIG_FILE
    document = load_yaml(config_path)
    if not isinstance(document, dict):
        raise ConfigError(f"{config_path}: expected a mapping at the top level")
    document = without_extensions(document)
    check_env_defined(env, document)
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
            required = tuple(merged["app"]["required_secrets"]) if merged else REQUIRED_SECRETS
            problems += secrets_problems(env, env_file, secrets, required)
            if merged:
                problems += database_problems(merged["database"], env_file, secrets, required)
                problems += monitoring_problems(merged["monitoring"], env_file, secrets)
    if problems:
        # Problems may quote values from the env file: redact before they reach the terminal.
        redactor = Redactor(v for k, v in secrets.items()
                            if v and k not in NON_SECRET_KEYS and PLACEHOLDER not in v)
        raise ConfigError([redactor(p) for p in problems])

    app = merged["app"]
    ports = env_block["ports"]
    mode = app["health"]["mode"]
    hosts = tuple(env_block["hosts"])
    # proxy.tls is the Compose proxies' (a swarm ends TLS at its load balancer).
    tls_hosts = hosts if env_block.get("engine", "compose") == "compose" else ()
    if merged["proxy"].get("tls"):
        warnings += [f"{config_path}: {warning}" for warning in tls_config.fleet_warnings(
            merged["proxy"]["tls"], tls_hosts)]
    return Settings(
        root=root,
        env=env,
        app_name=app["name"],
        image=app["image"],
        app_port=app["port"],
        health_endpoint=app["health_endpoint"],
        # A Togather app always has /version; a plain HTTP app only when it says so.
        version_endpoint=app.get("version_endpoint", "/version" if mode == "contract" else None),
        health_mode=mode,
        source_root=source_root(root, app.get("source")),
        confirm=env_block.get("confirm", False),
        hosts=hosts,
        remote_dir=_remote_dir(env_block, env),
        ports=dict(ports),
        public_url=env_block.get("public_url", f"http://127.0.0.1:{ports['proxy']}"),
        build=merged["build"],
        database=merged["database"],
        deployment=merged["deployment"],
        proxy=merged["proxy"],
        notifications=merged["notifications"],
        monitoring=merged["monitoring"],
        env_file=env_file,
        secrets=secrets,
        warnings=tuple(warnings),
        source_url=app["source"] if is_git_url(app.get("source") or "") else None,
        tls=tls_config.resolve(merged["proxy"]["tls"], root, ports["https"], tls_hosts,
                               ports["proxy"])
        if merged["proxy"].get("tls") else None,
        engine=env_block.get("engine", "compose"),
    )


def source_root(root: Path, source: str | None) -> Path:
    """Where the app's git work tree is: this repository (default), a folder inside it
    (a subdirectory of the same git repository works: its commits are the repository's), or
    for a git URL the local copy kept by source.refresh."""
    if not source:
        return root
    if is_git_url(source):
        from .source import remote_cache
        return remote_cache(source)
    return root / source


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

