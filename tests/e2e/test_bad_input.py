"""Bad input, one table: CLI arguments, deployment.yml, .env files, state files, git refs, host
keys and SSH keys. Every row runs the real CLI on a fresh demo app and checks the contract of
SPEC section 2: the documented exit code, exactly one `error:` line that says what is wrong, no
traceback, no secret in the output, and nothing changed anywhere (state file bytes, the remote
directory, the containers). A few "good input" rows (an original-format state file, a
placeholder in a comment) check that the tool accepts what it must accept.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    COMPAT_STATE_SCHEMA,
    SSH_ALIAS,
    DemoApp,
    assert_clean_failure,
    free_ports,
    run,
)

TESTBED_KEY = Path.home() / ".ssh" / "togather_testbed_ed25519"
TESTBED_KNOWN_HOSTS = Path.home() / ".ssh" / "togather_testbed_known_hosts"

ProcessEnv = dict[str, str | None]
Arrange = Callable[[DemoApp, Path], ProcessEnv | None]
After = Callable[[DemoApp, Path, subprocess.CompletedProcess], None]


@dataclass(frozen=True)
class Case:
    """One row. `args` follow `inv`; `{env}` becomes `--env=staging`, `{hex}` the app's id.
    `arrange` prepares the bad input (and may return extra process environment variables);
    `after` adds row-specific checks. With code 0, `stdout` lists what must be printed."""

    args: tuple[str, ...]
    code: int
    phrase: str = ""
    arrange: Arrange | None = None
    after: After | None = None
    stdout: tuple[str, ...] = ()
    bug: str | None = None


# --- arranging bad input --------------------------------------------------------------------


def config_path(app: DemoApp) -> Path:
    return app.path / "config" / "deployment.yml"


def write_yaml_text(app: DemoApp, text: str) -> None:
    config_path(app).write_text(text)


def write_document(app: DemoApp, document: dict[str, Any]) -> None:
    write_yaml_text(app, yaml.safe_dump(document, sort_keys=False))


def config(**overrides: Any) -> Arrange:
    def arrange(app: DemoApp, _tmp: Path) -> None:
        app.write_config(**overrides)
    return arrange


def staging(**overrides: Any) -> Arrange:
    """Override keys of environments.staging."""
    return config(environments={"staging": overrides})


def yaml_syntax_error(app: DemoApp, _tmp: Path) -> None:
    # line 3 starts with a tab: YAML forbids tabs for indentation
    lines = yaml.safe_dump(app.config_document(), sort_keys=False).splitlines()
    assert lines[0] == "app:"
    lines.insert(2, "\tport: 8080")
    write_yaml_text(app, "\n".join(lines) + "\n")


def duplicate_ports(app: DemoApp, _tmp: Path) -> None:
    app.write_config(environments={"staging": {"ports": {"green": app.ports["blue"]}}})


def without_staging(app: DemoApp, _tmp: Path) -> None:
    document = app.config_document()
    document["environments"] = {}
    write_document(app, document)


def no_config_file(app: DemoApp, _tmp: Path) -> None:
    config_path(app).unlink()


def read_env(app: DemoApp) -> list[str]:
    return app.env_file.read_text().splitlines()


def write_env(app: DemoApp, lines: list[str]) -> None:
    app.env_file.write_text("\n".join(lines) + "\n")
    os.chmod(app.env_file, 0o600)


def env_set(key: str, value: str | None) -> Arrange:
    """Replace (or with None remove) one variable of the env file; `{pw}` in the value is the
    real database password, so the output must redact it."""
    def arrange(app: DemoApp, _tmp: Path) -> None:
        password = app.secret_values["DATABASE_URL (password)"]
        lines = [line for line in read_env(app) if not line.startswith(f"{key}=")]
        if value is not None:
            lines.append(f"{key}={value.replace('{pw}', password)}")
        write_env(app, lines)
    return arrange


def env_append(line: str) -> Arrange:
    def arrange(app: DemoApp, _tmp: Path) -> None:
        write_env(app, [*read_env(app), line])
    return arrange


def env_missing(app: DemoApp, _tmp: Path) -> None:
    app.env_file.unlink()


def env_mode(mode: int) -> Arrange:
    def arrange(app: DemoApp, _tmp: Path) -> None:
        os.chmod(app.env_file, mode)
    return arrange


def production(app: DemoApp, _tmp: Path) -> None:
    """A production environment on the same test bed, with a valid, mode-600 secrets file."""
    app.write_config(environments={"production": {
        "hosts": [SSH_ALIAS], "remote_dir": str(Path(app.remote_dir).parent / "production"),
        "ports": dict(app.ports), "public_url": f"http://127.0.0.1:{app.ports['proxy']}"}})
    path = app.env_file.with_name(".env.production")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(app.env_file.read_text().replace("ENVIRONMENT=staging",
                                                  "ENVIRONMENT=production"))
    check = app.inv("config.validate", "--env=production")
    assert check.returncode == 0, check.stdout + check.stderr


def put_state_bytes(app: DemoApp, data: bytes) -> None:
    """Install any bytes as the state file, as the deploy user (no validation)."""
    run(["ssh", "-o", "BatchMode=yes", app.host,
         f"mkdir -p {app.remote_dir} && cat > {app.state_path}"], input=data)
    assert app.state_bytes() == data


def compat_example(environment: str = "staging") -> dict[str, Any]:
    """The first example of the original tools' state schema (current, previous, history)."""
    doc = json.loads(COMPAT_STATE_SCHEMA.read_text())["examples"][0]
    return {**doc, "environment": environment}


def state_bytes(data: bytes) -> Arrange:
    def arrange(app: DemoApp, _tmp: Path) -> None:
        put_state_bytes(app, data)
    return arrange


def state_doc(change: Callable[[dict[str, Any]], None]) -> Arrange:
    def arrange(app: DemoApp, _tmp: Path) -> None:
        if not COMPAT_STATE_SCHEMA.is_file():
            pytest.skip(f"{COMPAT_STATE_SCHEMA} not present")
        doc = compat_example()
        change(doc)
        put_state_bytes(app, (json.dumps(doc, indent=2) + "\n").encode())
    return arrange


def good_compat_state(app: DemoApp, _tmp: Path) -> None:
    if not COMPAT_STATE_SCHEMA.is_file():
        pytest.skip(f"{COMPAT_STATE_SCHEMA} not present")
    app.put_state(compat_example())


TRUNCATED = json.dumps(compat_example() if COMPAT_STATE_SCHEMA.is_file() else {
    "environment": "staging", "current_deployment": None}, indent=2).encode()[:150]


def set_current(value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.update(current_deployment=value)


def bad_version(doc: dict[str, Any]) -> None:
    doc["current_deployment"]["version"] = "zzz"


def other_environment(doc: dict[str, Any]) -> None:
    doc["environment"] = "production"


# --- SSH: a private ssh config per row (TOGATHER_SSH_CONFIG) --------------------------------


def new_key(tmp: Path, name: str) -> Path:
    key = tmp / name
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(key)])
    return key


def ssh_host(app: DemoApp, tmp: Path, *, known_hosts: str, identity: Path = TESTBED_KEY
             ) -> ProcessEnv:
    """Staging's host becomes an alias of the test bed defined in a private ssh config whose
    known_hosts holds `known_hosts`; no agent, so only `identity` can authenticate."""
    alias = f"e2e-bad-input-{app.hex}"
    (tmp / "known_hosts").write_text(known_hosts)
    path = tmp / "ssh_config"
    path.write_text(f"Host {alias}\n  HostName 127.0.0.1\n  Port 2222\n  User deploy\n"
                    f"  IdentityFile {identity}\n  IdentitiesOnly yes\n"
                    f"  UserKnownHostsFile {tmp / 'known_hosts'}\n"
                    f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n")
    path.chmod(0o600)
    app.write_config(environments={"staging": {"hosts": [alias]}})
    return {"TOGATHER_SSH_CONFIG": str(path), "SSH_AUTH_SOCK": None}


def unknown_host_key(app: DemoApp, tmp: Path) -> ProcessEnv:
    return ssh_host(app, tmp, known_hosts="")


def changed_host_key(app: DemoApp, tmp: Path) -> ProcessEnv:
    impostor = new_key(tmp, "impostor").with_suffix(".pub").read_text().split()
    return ssh_host(app, tmp, known_hosts=f"[127.0.0.1]:2222 {impostor[0]} {impostor[1]}\n")


def wrong_ssh_key(app: DemoApp, tmp: Path) -> ProcessEnv:
    return ssh_host(app, tmp, known_hosts=TESTBED_KNOWN_HOSTS.read_text(),
                    identity=new_key(tmp, "stranger"))


def unreachable_host(app: DemoApp, _tmp: Path) -> None:
    app.write_config(environments={"staging": {"hosts": [f"deploy@127.0.0.1:{free_ports(1)[0]}"]}})


def known_hosts_unchanged(expected: str | None = None) -> After:
    def after(_app: DemoApp, tmp: Path, _result: subprocess.CompletedProcess) -> None:
        text = (tmp / "known_hosts").read_text()
        if expected is not None:
            assert text == expected, "a refused host key was recorded"
        else:
            real_key = TESTBED_KNOWN_HOSTS.read_text().split()[2]
            assert real_key not in text, "a changed host key was replaced"
    return after


def no_file(pattern: str) -> After:
    def after(app: DemoApp, _tmp: Path, _result: subprocess.CompletedProcess) -> None:
        path = Path(pattern.replace("{hex}", app.hex))
        assert not path.exists(), f"{path} was created: a value reached a shell"
    return after


# --- the table ------------------------------------------------------------------------------

CASES: dict[str, Case] = {
    # CLI arguments
    "cli-deploy-without-env": Case(("deploy",), 2, "--env is required"),
    "cli-env-prod": Case(("deploy", "--env=prod"), 2, "unknown environment 'prod'"),
    "cli-env-flag-without-value": Case(("deploy", "--env"), 2, "--env"),
    "cli-unknown-flag": Case(("deploy", "{env}", "--bogus"), 2, "--bogus"),
    "cli-history-limit-abc": Case(("history", "{env}", "--limit=abc"), 2, "--limit"),
    "cli-history-limit-0": Case(("history", "{env}", "--limit=0"), 2, "--limit must be"),
    "cli-health-slot-purple": Case(("health", "{env}", "--slot=purple"), 2,
                                   "--slot must be active, blue or green"),
    "cli-restore-without-snapshot": Case(("db.restore", "{env}"), 2,
                                         "--snapshot=NAME is required"),
    "cli-restore-path-traversal": Case(("db.restore", "{env}", "--snapshot=../../etc/passwd",
                                        "--yes"), 2, "is not a snapshot name"),
    "cli-restore-needs-yes-without-terminal": Case(
        ("db.restore", "{env}", "--snapshot=staging_20260101T000000Z_abc1234.dump"), 2,
        "needs --yes"),
    "cli-cleanup-keep-images-1": Case(("cleanup", "{env}", "--keep-images=1"), 2,
                                      "--keep-images must be >= 2"),
    "cli-cleanup-keep-images-abc": Case(("cleanup", "{env}", "--keep-images=abc"), 2,
                                        "takes a whole number"),
    "cli-lock-acquire-without-message": Case(("lock.acquire", "{env}"), 2,
                                             "--message is required"),
    "cli-rollback-without-deployment": Case(("rollback", "{env}"), 1, "nothing to roll back"),
    "cli-production-deploy-without-yes": Case(("deploy", "--env=production"), 2,
                                              "pass --yes", arrange=production),
    "cli-production-rollback-without-yes": Case(("rollback", "--env=production"), 2,
                                                "pass --yes", arrange=production),
    # git refs
    "ref-does-not-exist": Case(("deploy", "{env}", "--ref=no-such-branch"), 2,
                               "does not resolve to a commit"),
    "ref-command-substitution": Case(("deploy", "{env}", "--ref=$(touch /tmp/pwned-{hex})"), 2,
                                     "not a valid git ref", after=no_file("/tmp/pwned-{hex}")),
    "ref-backticks": Case(("deploy", "{env}", "--ref=`touch /tmp/pwned-{hex}`"), 2,
                          "not a valid git ref", after=no_file("/tmp/pwned-{hex}")),
    "ref-option-like": Case(("deploy", "{env}", "--ref=-rf"), 2, "not a valid git ref"),
    "ref-shell-metacharacters": Case(("deploy", "{env}", "--ref=main;rm -rf /"), 2,
                                     "not a valid git ref"),
    "ref-embedded-newline": Case(("deploy", "{env}", "--ref=main\nHEAD"), 2,
                                 "not a valid git ref"),
    "ref-trailing-newline": Case(("deploy", "{env}", "--ref=main\n"), 2, r"'main\n'"),
    "ref-empty": Case(("deploy", "{env}", "--ref="), 2, "not a valid git ref"),
    "ref-range": Case(("deploy", "{env}", "--ref=main..HEAD"), 2, "not a valid git ref"),
    # deployment.yml
    "yml-syntax-error": Case(("deploy", "{env}"), 10, "invalid YAML at line 3",
                             arrange=yaml_syntax_error),
    "yml-empty-file": Case(("deploy", "{env}"), 10, "expected a mapping at the top level",
                           arrange=lambda app, _tmp: write_yaml_text(app, "")),
    "yml-missing-file": Case(("deploy", "{env}"), 10, "deployment.yml: file not found",
                             arrange=no_config_file),
    "yml-unknown-top-level-key": Case(("deploy", "{env}"), 10, "unknown key(s) 'colour'",
                                      arrange=config(colour="blue")),
    "yml-unknown-nested-key": Case(("deploy", "{env}"), 10,
                                   "deployment.health_check: unknown key(s) 'retry'",
                                   arrange=config(deployment={"health_check": {"retry": 3}})),
    "yml-port-not-an-integer": Case(("deploy", "{env}"), 10,
                                    "ports.proxy: 'eighty' is not of type 'integer'",
                                    arrange=staging(ports={"proxy": "eighty"})),
    "yml-section-not-a-mapping": Case(("deploy", "{env}"), 10,
                                      "deployment: 'fast' is not of type 'object'",
                                      arrange=config(deployment="fast")),
    "yml-unknown-migration-tool": Case(("deploy", "{env}"), 10, "'flyway' is not one of",
                                       arrange=config(database={"migration_tool": "flyway"})),
    "yml-staging-missing": Case(("deploy", "{env}"), 10, "environments.staging is not defined",
                                arrange=without_staging),
    "yml-duplicate-ports": Case(("deploy", "{env}"), 10, "three different ports",
                                arrange=duplicate_ports),
    "yml-hostile-host": Case(("deploy", "{env}"), 10, "hosts.0",
                             arrange=staging(hosts=["a;touch /tmp/pwned-x"]),
                             after=no_file("/tmp/pwned-x")),
    "yml-relative-remote-dir": Case(("deploy", "{env}"), 10, "remote_dir",
                                    arrange=staging(remote_dir="srv/togather/staging")),
    "yml-build-context-outside": Case(("deploy", "{env}"), 10,
                                      "build.context must be a path inside the repository",
                                      arrange=config(build={"context": "../outside"})),
    # .env.staging
    "env-file-missing": Case(("deploy", "{env}"), 10, ".env.staging.example",
                             arrange=env_missing),
    "env-mode-644": Case(("deploy", "{env}"), 10, "chmod 600", arrange=env_mode(0o644)),
    "env-mode-640": Case(("deploy", "{env}"), 10, "chmod 600", arrange=env_mode(0o640)),
    "env-change-me": Case(("deploy", "{env}"), 10, "ADMIN_API_KEY still holds the",
                          arrange=env_set("ADMIN_API_KEY", "CHANGE_ME")),
    "env-change-me-message-names-the-placeholder": Case(
        ("deploy", "{env}"), 10, "ADMIN_API_KEY still holds the CHANGE_ME placeholder",
        arrange=env_set("ADMIN_API_KEY", "CHANGE_ME")),
    "env-environment-mismatch": Case(("deploy", "{env}"), 10,
                                     "belongs to another environment",
                                     arrange=env_set("ENVIRONMENT", "production")),
    "env-jwt-secret-missing": Case(("deploy", "{env}"), 10, "JWT_SECRET is missing",
                                   arrange=env_set("JWT_SECRET", None)),
    "env-jwt-secret-empty": Case(("deploy", "{env}"), 10, "JWT_SECRET is missing or empty",
                                 arrange=env_set("JWT_SECRET", "")),
    "env-database-url-mysql": Case(("deploy", "{env}"), 10, "must start with postgres://",
                                   arrange=env_set("DATABASE_URL",
                                                   "mysql://togather:{pw}@127.0.0.1/app")),
    "env-database-url-without-database": Case(("deploy", "{env}"), 10,
                                              "must name a user, a host and a database",
                                              arrange=env_set("DATABASE_URL",
                                                              "postgres://u:{pw}@127.0.0.1/")),
    "env-unparsable-line": Case(("deploy", "{env}"), 10, "cannot parse this line",
                                arrange=env_append("NOT A VALID LINE")),
    "env-unparsable-line-hint-readable": Case(
        ("deploy", "{env}"), 10, "expected NAME=VALUE", arrange=env_append("NOT A VALID LINE")),
    # state files on the host
    "state-truncated-deploy": Case(("deploy", "{env}"), 1, "is not valid JSON",
                                   arrange=state_bytes(TRUNCATED)),
    "state-truncated-status": Case(("status", "{env}"), 1, "is not valid JSON",
                                   arrange=state_bytes(TRUNCATED)),
    "state-truncated-lock-acquire": Case(("lock.acquire", "{env}", "--message=maintenance"), 1,
                                         "is not valid JSON", arrange=state_bytes(TRUNCATED)),
    "state-truncated-rollback": Case(("rollback", "{env}"), 1, "is not valid JSON",
                                     arrange=state_bytes(TRUNCATED)),
    "state-not-utf8": Case(("deploy", "{env}"), 1, "not UTF-8",
                           arrange=state_bytes(b'{"environment": "staging\xff\xfe"}\n')),
    "state-wrong-types": Case(("deploy", "{env}"), 1, "does not match the state schema",
                              arrange=state_doc(set_current(5))),
    "state-version-violates-schema": Case(("rollback", "{env}"), 1,
                                          "does not match the state schema",
                                          arrange=state_doc(bad_version)),
    "state-other-environment": Case(("deploy", "{env}"), 1,
                                    "belongs to environment 'production'",
                                    arrange=state_doc(other_environment)),
    # good input: what must be accepted
    "good-original-format-state-status": Case(("status", "{env}"), 0, arrange=good_compat_state,
                                              stdout=("abc1234", "abc5678")),
    "good-original-format-state-history": Case(("history", "{env}"), 0,
                                               arrange=good_compat_state, stdout=("def9876",)),
    "good-change-me-in-a-comment": Case(("config.validate", "{env}"), 0,
                                        arrange=env_append("# replace CHANGE_ME values above"),
                                        stdout=("configuration is valid",)),
    # host keys and SSH keys
    "ssh-unknown-host-key": Case(("deploy", "{env}"), 1, "unknown host key",
                                 arrange=unknown_host_key, after=known_hosts_unchanged("")),
    "ssh-changed-host-key": Case(("deploy", "{env}"), 1, "CHANGED", arrange=changed_host_key,
                                 after=known_hosts_unchanged()),
    "ssh-wrong-key": Case(("deploy", "{env}"), 1, "authentication", arrange=wrong_ssh_key),
    "ssh-unreachable-host": Case(("deploy", "{env}"), 1, "cannot reach",
                                 arrange=unreachable_host),
}


def _params() -> list[Any]:
    params = []
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(reason=case.bug, strict=True)] if case.bug else []
        params.append(pytest.param(case, id=name, marks=marks))
    return params


# --- what could change ----------------------------------------------------------------------


def listing(root: Path) -> dict[str, tuple[int, int, int]] | None:
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size,
                                       p.lstat().st_mtime_ns)
            for p in sorted([root, *root.rglob("*")])}


def what_could_change(app: DemoApp) -> dict[str, Any]:
    """State file bytes, the remote directory (and its parent, where another environment of
    the same app lives), the app's containers."""
    return {"state": app.state_bytes(), "tree": app.tree(),
            "app dir": listing(Path(app.remote_dir).parent), "containers": app.containers()}


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, demo_app: DemoApp, tmp_path: Path) -> None:
    app = demo_app
    extra_env = case.arrange(app, tmp_path) if case.arrange else None
    args = [a.replace("{env}", app.env_flag).replace("{hex}", app.hex) for a in case.args]
    before = what_could_change(app)

    result = app.inv(*args, env=extra_env, timeout=120)

    output = result.stdout + result.stderr
    if case.code == 0:
        assert result.returncode == 0, output
        assert "Traceback" not in output and "error:" not in result.stderr, output
        for text in case.stdout:
            assert text in result.stdout, f"{text!r} not in:\n{output}"
    else:
        assert_clean_failure(result, contains=case.phrase, code=case.code)
    after = what_could_change(app)
    for what in before:
        assert after[what] == before[what], f"{what} changed"
    if case.after:
        case.after(app, tmp_path, result)
    app.assert_no_secrets()


def test_the_table_is_big_enough() -> None:
    kinds = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 32
    assert {"cli", "ref", "yml", "env", "state", "good", "ssh"} <= kinds

