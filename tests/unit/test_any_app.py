"""Adopting the tool for any app (issue 11): required secrets, apps without a database, the
`http` health mode, free environment names, `x-` keys, app.source and migrations run inside
the new image. Pure: configuration, verdicts and command strings."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from togather_tasks import commands as cmd
from togather_tasks import snapshots, source
from togather_tasks.config import check_env_name
from togather_tasks.errors import ConfigError, ExitCode
from togather_tasks.health import judge, running_version

from .projects import BASE_CONFIG, Project
from .test_config import only_problem

SHA = "abc1234"


def fetcher(answers: dict[str, tuple[int, bytes]]):
    asked: list[str] = []

    def fetch(path: str) -> tuple[int, bytes]:
        asked.append(path)
        return answers[path]

    fetch.asked = asked  # type: ignore[attr-defined]
    return fetch


def http_judge(answers: dict[str, tuple[int, bytes]], *, version_endpoint: str | None = "/v",
               expected: str | None = SHA):
    return judge(fetcher(answers), mode="http", health_endpoint="/up",
                 version_endpoint=version_endpoint, expected_version=expected)


# --- health mode http -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 204, 299])
def test_http_mode_any_2xx_is_healthy(status: int) -> None:
    verdict = http_judge({"/up": (status, b"<html>whatever</html>")}, version_endpoint=None)
    assert verdict.status == "healthy"
    assert verdict.acceptable(require_healthy=True)


@pytest.mark.parametrize("status", [301, 404, 500, 503])
def test_http_mode_anything_else_is_unhealthy_and_says_so(status: int) -> None:
    verdict = http_judge({"/up": (status, b"{}")})
    assert verdict.status == "unhealthy"
    assert f"HTTP {status}" in verdict.summary()
    assert "any 2xx" in verdict.summary()


@pytest.mark.parametrize("version_body", [b'{"version": "abc1234", "built": "x"}',
                                          b"abc1234\n", b"abc1234567890 extra"])
def test_http_mode_reads_the_version_from_the_version_endpoint(version_body: bytes) -> None:
    verdict = http_judge({"/up": (200, b"ok"), "/v": (200, version_body)})
    assert verdict.status == "healthy"
    assert verdict.version.startswith(SHA)


def test_http_mode_wrong_version_is_unhealthy() -> None:
    verdict = http_judge({"/up": (200, b"ok"), "/v": (200, b'{"version": "def5678"}')})
    assert verdict.status == "unhealthy"
    assert "def5678 is not the expected abc1234" in verdict.summary()


def test_http_mode_version_endpoint_without_a_version_is_unhealthy() -> None:
    verdict = http_judge({"/up": (200, b"ok"), "/v": (404, b"not found")})
    assert verdict.status == "unhealthy"
    assert "HTTP 404 without a version" in verdict.summary()


def test_http_mode_without_version_endpoint_asks_only_the_health_endpoint() -> None:
    fetch = fetcher({"/up": (200, b"")})
    verdict = judge(fetch, mode="http", health_endpoint="/up", version_endpoint=None,
                    expected_version=SHA)
    assert verdict.status == "healthy"
    assert fetch.asked == ["/up"]


def test_contract_mode_is_todays_contract() -> None:
    verdict = judge(fetcher({"/health": (200, b"ok")}), mode="contract",
                    health_endpoint="/health", version_endpoint="/version")
    assert verdict.status == "invalid"


@pytest.mark.parametrize(("body", "version"), [(b'{"version": "abc"}', "abc"), (b"", None),
                                               (b'{"v": 1}', None), (b"[1]", None),
                                               (b"1234567\n", "1234567"), (b"12e4567", "12e4567")])
def test_running_version(body: bytes, version: str | None) -> None:
    assert running_version(body) == version


# --- configuration --------------------------------------------------------------------------


def no_database_project(project: Project, extra: str = "") -> Project:
    project.write_config(BASE_CONFIG.replace(
        "app:\n  name: togather-test\n",
        "app:\n  name: togather-test\n  required_secrets: [SECRET_KEY_BASE]\n"
        "  health: {mode: http}\n" + extra) + "database:\n  migration_tool: none\n")
    project.write_env("staging", "ENVIRONMENT=staging\nSECRET_KEY_BASE=k3y-base-0123456789\n")
    return project


def test_an_app_without_a_database_loads(project: Project) -> None:
    s = no_database_project(project).load("staging")
    assert not s.has_database
    assert s.health_mode == "http"
    assert s.version_endpoint is None
    assert not s.migrates_on_host


def test_no_database_url_is_a_clear_error_for_database_commands(project: Project) -> None:
    s = no_database_project(project).load("staging")
    with pytest.raises(ConfigError) as info:
        s.migrate_database_url  # noqa: B018
    assert "no DATABASE_URL" in info.value.message


def test_http_mode_keeps_a_version_endpoint_it_is_given(project: Project) -> None:
    s = no_database_project(project, "  version_endpoint: /release\n").load("staging")
    assert s.version_endpoint == "/release"


def test_required_secrets_replace_togathers_list(project: Project) -> None:
    no_database_project(project)
    project.write_env("staging", "ENVIRONMENT=staging\n")
    problem = only_problem(project)
    assert "SECRET_KEY_BASE is missing or empty (required)" in problem


def test_environment_is_required_whatever_the_list(project: Project) -> None:
    no_database_project(project)
    project.write_env("staging", "SECRET_KEY_BASE=k3y-base-0123456789\n")
    assert "ENVIRONMENT is missing" in only_problem(project)


def test_a_host_migration_tool_needs_database_url(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("  name: togather-test\n",
                                             "  name: togather-test\n  required_secrets: []\n"))
    project.write_env("staging", "ENVIRONMENT=staging\n")
    problem = only_problem(project)
    assert "DATABASE_URL is required with database.migration_tool dbmate" in problem


@pytest.mark.parametrize(("snippet", "path"), [
    ("  health: {mode: grpc}\n", "app.health.mode"),
    ("  health: {mod: http}\n", "app.health"),
    ("  required_secrets: [BAD-NAME]\n", "app.required_secrets.0"),
    ("  required_secrets: JWT_SECRET\n", "app.required_secrets"),
    ("  required_secrets: [A, A]\n", "app.required_secrets"),
    ("  source: ''\n", "app.source"),
    ("  version_endpoint: health\n", "app.version_endpoint"),
])
def test_bad_app_keys_name_the_key(project: Project, snippet: str, path: str) -> None:
    project.write_config(BASE_CONFIG.replace("  name: togather-test\n",
                                             "  name: togather-test\n" + snippet))
    problem = only_problem(project)
    assert f": {path}: " in problem


def test_contract_mode_needs_a_version_endpoint(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("  name: togather-test\n",
                                             "  name: togather-test\n  version_endpoint:\n"))
    assert "app.version_endpoint" in only_problem(project)


@pytest.mark.parametrize("source_path", ["/abs/path", "../elsewhere", "a/../../b"])
def test_source_path_stays_inside_the_repository(project: Project, source_path: str) -> None:
    project.write_config(BASE_CONFIG.replace(
        "  name: togather-test\n", f"  name: togather-test\n  source: {source_path}\n"))
    assert "app.source" in only_problem(project)


def test_source_path_and_url(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace(
        "  name: togather-test\n", "  name: togather-test\n  source: examples/demo\n"))
    s = project.load("staging")
    assert s.source_root == project.root / "examples" / "demo"
    assert s.source_url is None
    for url in ("https://git.example.com/team/app.git", "git@github.com:team/app.git"):
        project.write_config(BASE_CONFIG.replace(
            "  name: togather-test\n", f"  name: togather-test\n  source: '{url}'\n"))
        s = project.load("staging")
        assert s.source_url == url
        assert s.source_root == source.remote_cache(url)
        assert s.source_root.name.startswith("app.git-")


def test_command_migration_tool_needs_a_command(project: Project) -> None:
    project.write_config(BASE_CONFIG + "database:\n  migration_tool: command\n")
    assert "migration_command is required when migration_tool is command" in \
        only_problem(project)


def test_config_errors_exit_10(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("  name: togather-test\n",
                                             "  name: togather-test\n  health: {mode: x}\n"))
    with pytest.raises(ConfigError) as info:
        project.load("staging")
    assert info.value.exit_code == ExitCode.CONFIG_ERROR == 10


# --- environments and x- keys ---------------------------------------------------------------


def test_a_free_environment_name_gets_staging_like_defaults(project: Project) -> None:
    project.write_config(BASE_CONFIG + "  qa-1:\n    hosts: [qa.example.com]\n")
    project.write_env("qa-1")
    s = project.load("qa-1")
    assert s.ports == {"proxy": 8080, "blue": 8081, "green": 8082}
    assert s.remote_dir == "/srv/togather/qa-1"
    assert s.compose_project == "togather-test-qa-1"
    assert not s.confirm


def test_production_confirms_and_any_environment_may(project: Project) -> None:
    project.write_config(BASE_CONFIG + "  eu-prod:\n    hosts: [eu.example.com]\n"
                         "    confirm: true\n")
    project.write_env("production")
    project.write_env("eu-prod")
    assert project.load("production").confirm
    assert project.load("eu-prod").confirm
    assert not project.load("staging").confirm


@pytest.mark.parametrize("snippet", ["  Bad_Env:\n    hosts: [h]\n",
                                     "  qa:\n    hosts: [h]\n    confirm: maybe\n"])
def test_bad_environment_blocks_are_config_errors(project: Project, snippet: str) -> None:
    project.write_config(BASE_CONFIG + snippet)
    assert "environments" in only_problem(project)


def test_x_keys_are_allowed_at_every_level_for_anchors(project: Project) -> None:
    project.write_config("""\
x-ports: &ports {proxy: 9080, blue: 9081, green: 9082}
app:
  name: togather-test
  x-note: anything
build:
  dockerfile: app/Dockerfile
deployment:
  x-hc: &hc {retries: 3}
  health_check: *hc
environments:
  x-common: &common
    remote_dir: /srv/togather/staging
  staging:
    <<: *common
    hosts: [staging.example.com]
    ports: *ports
    x-comment: ignored
""")
    s = project.load("staging")
    assert s.ports == {"proxy": 9080, "blue": 9081, "green": 9082}
    assert s.deployment["health_check"]["retries"] == 3
    assert s.remote_dir == "/srv/togather/staging"


def test_other_unknown_keys_are_still_errors(project: Project) -> None:
    project.write_config(BASE_CONFIG + "xnote: 1\n")
    assert "'xnote'" in only_problem(project)


def test_an_x_environment_name_is_reserved() -> None:
    with pytest.raises(Exception) as info:
        check_env_name("x-ray")
    assert "x-" in str(info.value)


# --- snapshots, migrations in the image -----------------------------------------------------


@pytest.mark.parametrize("env", ["qa-1", "eu-prod", "preview-42", "staging"])
def test_snapshot_names_of_any_environment_parse(env: str) -> None:
    name = snapshots.snapshot_name(env, "20261126T181500Z", SHA)
    match = snapshots.SNAPSHOT_RE.match(name)
    assert match and match["env"] == env and match["sha"] == SHA


def test_a_snapshot_of_another_environment_is_refused() -> None:
    from togather_tasks.dbops import check_snapshot_name
    from togather_tasks.errors import UsageError
    with pytest.raises(UsageError) as info:
        check_snapshot_name("qa", "qa-1_20261126T181500Z_abc1234.dump")
    assert "of the qa-1 environment" in info.value.message


def test_migration_command_runs_in_a_one_off_container_of_the_new_image(
        project: Project) -> None:
    project.write_config(BASE_CONFIG + "database:\n  migration_tool: command\n"
                         "  migration_command: bin/migrate up --verbose\n"
                         "  migration_timeout: 90\n")
    s = project.load("staging")
    assert cmd.migrate_command(s, "/unused", "togather-server:abc1234") == (
        "BLUE_IMAGE=togather-server:abc1234 timeout --kill-after=10 90 docker compose "
        "--project-name togather-test-staging --project-directory /srv/togather/staging "
        "--file /srv/togather/staging/compose.yml "
        "--file /srv/togather/staging/compose.oneoff.yml run --rm --no-deps -T app-blue sh -c "
        "'bin/migrate up --verbose' < /dev/null")
    assert cmd.migration_tool_binary("command") is None


# --- app.source in a subdirectory of a git repository ---------------------------------------


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout


def test_a_source_folder_inside_the_repository(tmp_path: Path) -> None:
    app = tmp_path / "examples" / "demo"
    (app / "db" / "migrations").mkdir(parents=True)
    (app / "Dockerfile").write_text("FROM scratch\n")
    (app / "db" / "migrations" / "1_a.sql").write_text("-- a\n")
    (tmp_path / "README").write_text("top\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "x")
    commit = source.resolve_ref(app, "HEAD")
    assert source.has_path(app, commit, "Dockerfile")
    assert not source.has_path(app, commit, "README")
    assert source.list_dir(app, commit, "db/migrations") == ["1_a.sql"]
    (tmp_path / "README").write_text("changed\n")
    assert not source.uncommitted_changes(app)
    with tarfile.open(fileobj=io.BytesIO(source.archive(app, commit))) as tar:
        names = tar.getnames()
    assert "Dockerfile" in names and "README" not in names
