"""config.load_settings: deployment.yml + per-environment overrides + the secrets file."""

from __future__ import annotations

import logging
import os

import pytest

from togather_tasks.config import check_env_name, deep_merge
from togather_tasks.errors import ConfigError, ExitCode, UsageError

from .projects import ADMIN_API_KEY, BASE_CONFIG, DB_PASSWORD, DB_URL, JWT_SECRET, Project


def problems_of(project: Project, env: str = "staging") -> list[str]:
    with pytest.raises(ConfigError) as info:
        project.load(env)
    return info.value.problems


def env_text_with(extra: str) -> str:
    return (f"ENVIRONMENT=staging\nDATABASE_URL={DB_URL}\nJWT_SECRET={JWT_SECRET}\n"
            f"ADMIN_API_KEY={ADMIN_API_KEY}\n{extra}")


def only_problem(project: Project, env: str = "staging") -> str:
    problems = problems_of(project, env)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid configurations -------------------------------------------------------------------


def test_minimal_valid_config_loads(project: Project) -> None:
    s = project.load("staging")
    assert s.env == "staging"
    assert s.app_name == "togather-test"
    assert s.hosts == ("deploy@staging.example.com:2222",)
    assert s.primary_host == "deploy@staging.example.com:2222"
    assert s.remote_dir == "/srv/togather/staging"
    assert s.ports == {"proxy": 9080, "blue": 9081, "green": 9082}
    assert s.public_url == "http://127.0.0.1:9080"
    assert s.secrets == {"ENVIRONMENT": "staging", "DATABASE_URL": DB_URL,
                         "JWT_SECRET": JWT_SECRET, "ADMIN_API_KEY": ADMIN_API_KEY}
    assert s.warnings == ()


def test_defaults_fill_what_the_file_leaves_out(project: Project) -> None:
    s = project.load("staging")
    assert s.image == "togather-server"
    assert s.app_port == 8080
    assert s.health_endpoint == "/health"
    assert s.build["strategy"] == "remote"
    assert s.build["dockerfile"] == "app/Dockerfile"
    assert s.database["migration_tool"] == "dbmate"
    assert s.deployment["lock_timeout_minutes"] == 30
    assert s.compose_project == "togather-test-staging"
    assert s.state_path == "/srv/togather/staging/deployment-state.json"
    assert s.snapshot_dir == "/srv/togather/staging/snapshots"


def test_production_gets_default_ports_and_remote_dir(project: Project) -> None:
    project.write_env("production")
    s = project.load("production")
    assert s.ports == {"proxy": 80, "blue": 8081, "green": 8082}
    assert s.remote_dir == "/srv/togather/production"


def test_development_defaults_to_the_local_host(project: Project) -> None:
    s = project.load("development")
    assert s.hosts == ("local",)
    assert s.ports == {"proxy": 8080, "blue": 8081, "green": 8082}


def test_per_environment_overrides_deep_merge_over_the_base(project: Project) -> None:
    project.write_config("""\
app:
  name: togather-test
deployment:
  drain_seconds: 3
  stop_timeout: 11
  health_check: {retries: 7, interval: 2}
environments:
  staging:
    hosts: [staging.example.com]
    deployment:
      drain_seconds: 9
      health_check: {interval: 0.5}
  production:
    hosts: [prod.example.com]
""")
    staging = project.load("staging")
    assert staging.deployment["drain_seconds"] == 9
    assert staging.deployment["stop_timeout"] == 11
    assert staging.deployment["health_check"] == {
        "retries": 7, "interval": 0.5, "timeout": 5, "startup_grace": 1, "deadline": 60}
    assert staging.health.interval == 0.5
    project.write_env("production")
    production = project.load("production")
    assert production.deployment["drain_seconds"] == 3
    assert production.deployment["health_check"]["interval"] == 2


def test_partial_port_override_keeps_the_other_defaults(project: Project) -> None:
    project.write_config(BASE_CONFIG + "  development:\n    ports: {proxy: 7000}\n")
    assert project.load("development").ports == {"proxy": 7000, "blue": 8081, "green": 8082}


def test_deep_merge_does_not_modify_its_inputs() -> None:
    base = {"a": {"b": 1, "c": [1]}}
    override = {"a": {"b": 2}}
    merged = deep_merge(base, override)
    merged["a"]["c"].append(2)
    assert merged == {"a": {"b": 2, "c": [1, 2]}}
    assert base == {"a": {"b": 1, "c": [1]}}
    assert override == {"a": {"b": 2}}


@pytest.mark.parametrize("line, expected", [
    ("JWT_SECRET='it\"s a $(rm -rf /) `id` $HOME'", 'it"s a $(rm -rf /) `id` $HOME'),
    ("JWT_SECRET=abc$HOME${PATH}", "abc$HOME${PATH}"),
    ('JWT_SECRET="dq \\"quoted\\" $(whoami) `id`"', 'dq "quoted" $(whoami) `id`'),
    ("JWT_SECRET=héllo wörld ✓ 密码", "héllo wörld ✓ 密码"),
    ("JWT_SECRET='  spaces kept  '", "  spaces kept  "),
    ("JWT_SECRET=abc#not-a-comment", "abc#not-a-comment"),
    ("JWT_SECRET='multi\nline'", "multi\nline"),
])
def test_env_values_come_back_literally(project: Project, line: str, expected: str) -> None:
    project.write_env("staging", f"ENVIRONMENT=staging\nDATABASE_URL={DB_URL}\n"
                                 f"ADMIN_API_KEY={ADMIN_API_KEY}\n{line}\n")
    assert project.load("staging").secrets["JWT_SECRET"] == expected


def test_dollar_references_are_not_interpolated(project: Project,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOGATHER_TEST_VAR", "from-os-environ")
    project.write_env("staging", JWT_SECRET="x$TOGATHER_TEST_VAR${ADMIN_API_KEY}y")
    assert project.load("staging").secrets["JWT_SECRET"] == "x$TOGATHER_TEST_VAR${ADMIN_API_KEY}y"


def test_loading_does_not_touch_os_environ(project: Project,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    project.load("staging")
    assert "JWT_SECRET" not in os.environ


def test_secret_values_exclude_the_environment_name(settings) -> None:
    assert sorted(settings.secret_values()) == sorted([DB_URL, JWT_SECRET, ADMIN_API_KEY])


def test_redactor_of_settings_masks_the_database_password(settings) -> None:
    assert DB_PASSWORD not in settings.redactor()(f"password is {DB_PASSWORD}")


def test_deploy_database_url_takes_precedence_for_the_host(project: Project) -> None:
    host_url = "postgres://togather_app:pw-for-host@127.0.0.1:5432/togather_staging"
    project.write_env("staging", DEPLOY_DATABASE_URL=host_url)
    s = project.load("staging")
    assert s.migrate_database_url == host_url
    assert s.secrets["DATABASE_URL"] == DB_URL


def test_require_secrets_false_needs_no_env_file(project: Project) -> None:
    project.env_path("staging").unlink()
    s = project.load("staging", require_secrets=False)
    assert s.secrets == {}


# --- deployment.yml problems --------------------------------------------------------------


def test_missing_deployment_yml(project: Project) -> None:
    project.config_path.unlink()
    problem = only_problem(project)
    assert str(project.config_path) in problem
    assert "not found" in problem


def test_empty_deployment_yml(project: Project) -> None:
    project.write_config("")
    assert "mapping" in only_problem(project)


def test_yaml_syntax_error_names_the_line(project: Project) -> None:
    project.write_config("app:\n  name: togather-test\n  port: [8080\nbuild: {}\n")
    problem = only_problem(project)
    assert str(project.config_path) in problem
    assert "invalid YAML" in problem
    assert "line 4" in problem


def test_unknown_keys_at_every_level_are_all_reported_at_once(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("app:\n", "colour: blue\napp:\n  nmae: typo\n")
                         + "    host: typo\n  Q_A:\n    hosts: [local]\n"
                         + "deployment:\n  health_check: {retry: 3}\n")
    problems = problems_of(project)
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for key in ("'colour'", "'nmae'", "'host'", "'Q_A'", "'retry'"):
        assert key in text
    assert all(p.startswith(str(project.config_path)) for p in problems)


def test_unknown_key_problem_names_the_path_and_the_allowed_keys(project: Project) -> None:
    project.write_config(BASE_CONFIG + "deployment:\n  health_check: {retry: 3}\n")
    problem = only_problem(project)
    assert "deployment.health_check" in problem
    assert "unknown key(s) 'retry'" in problem
    assert "retries" in problem


@pytest.mark.parametrize("snippet, path", [
    ("app:\n  name: togather-test\n  port: eighty\n", "app.port"),
    ("app:\n  name: Bad Name!\n", "app.name"),
    ("app:\n  name: x\nbuild:\n  strategy: ftp\n", "build.strategy"),
    ("app:\n  name: x\ndatabase:\n  migration_tool: flyway\n", "database.migration_tool"),
    ("app:\n  name: x\nproxy:\n  bind: not-an-ip\n", "proxy.bind"),
    ("app:\n  name: x\ndeployment:\n  keep_images: 1\n", "deployment.keep_images"),
    ("build: {}\n", "(top level)"),
])
def test_schema_violations_name_the_key(project: Project, snippet: str, path: str) -> None:
    project.write_config(snippet + "environments:\n  staging:\n    hosts: [h]\n")
    problem = only_problem(project)
    assert f": {path}: " in problem


def test_staging_without_its_environment_block(project: Project) -> None:
    project.write_config("app:\n  name: togather-test\n")
    problem = only_problem(project)
    assert "environments.staging" in problem


def test_environment_block_without_hosts(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("    hosts: [deploy@staging.example.com:2222]\n",
                                             ""))
    assert "environments.staging.hosts is required" in only_problem(project)


def test_duplicate_ports(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("blue: 9081", "blue: 9080"))
    problem = only_problem(project)
    assert "environments.staging.ports" in problem
    assert "different ports" in problem


def test_proxy_subnet_is_validated(project: Project) -> None:
    project.write_config(BASE_CONFIG + "proxy:\n  subnet: 8.8.8.0/29\n")
    assert "proxy.subnet: 8.8.8.0/29: not a private network" in only_problem(project)


def test_proxy_subnet_sets_the_edge_addresses(project: Project) -> None:
    project.write_config(BASE_CONFIG + "proxy:\n  subnet: 10.201.0.8/29\n")
    settings = project.load()
    assert str(settings.edge_subnet) == "10.201.0.8/29"
    assert settings.edge_address("green") == "10.201.0.11"


@pytest.mark.parametrize("value, ok", [("1", True), ("8", True), ("auto", True),
                                       ("0", False), ("many", False), ("1.5", False)])
def test_proxy_workers_is_a_count_or_auto(project: Project, value: str, ok: bool) -> None:
    project.write_config(BASE_CONFIG + f"proxy:\n  workers: {value}\n")
    if ok:
        assert str(project.load().proxy["workers"]) == value
    else:
        assert "proxy" in only_problem(project) and "workers" in only_problem(project)


@pytest.mark.parametrize("value, ok", [("100m", True), ("1g", True), ("0", True),
                                       ("1048576", True), ("512K", True), ("100mb", False),
                                       ("-1", False), ("1.5m", False), ("lots", False)])
def test_proxy_max_body_size_is_an_nginx_size(project: Project, value: str, ok: bool) -> None:
    project.write_config(BASE_CONFIG + f"proxy:\n  max_body_size: {value}\n")
    if ok:
        assert str(project.load().proxy["max_body_size"]) == value
    else:
        assert (f"proxy.max_body_size: {value!r} is not a size" in only_problem(project)
                or "max_body_size" in only_problem(project))


def test_proxy_body_size_and_read_timeout_defaults(project: Project) -> None:
    project.write_config(BASE_CONFIG)
    proxy = project.load().proxy
    assert (proxy["max_body_size"], proxy["read_timeout"], proxy["keepalive"]) == \
        ("100m", 60, 1024)
    project.write_config(BASE_CONFIG + "proxy:\n  read_timeout: 0\n")
    assert "read_timeout" in only_problem(project)


def test_custom_migration_tool_needs_a_command(project: Project) -> None:
    project.write_config(BASE_CONFIG + "database:\n  migration_tool: custom\n")
    assert "database.migration_command" in only_problem(project)


def test_custom_migration_tool_with_a_command_is_valid(project: Project) -> None:
    project.write_config(BASE_CONFIG + "database:\n  migration_tool: custom\n"
                                       "  migration_command: ./migrate.sh up\n")
    assert project.load().database["migration_command"] == "./migrate.sh up"


def test_registry_strategy_needs_a_registry(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("build:\n", "build:\n  strategy: registry\n"))
    assert "build.registry" in only_problem(project)


def test_registry_strategy_with_a_registry_is_valid(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace(
        "build:\n", "build:\n  strategy: registry\n  registry: registry.example.com:5000/team\n"))
    assert project.load().build["registry"] == "registry.example.com:5000/team"


@pytest.mark.parametrize("key, value", [
    ("context", "../outside"),
    ("context", "sub/../../outside"),
    ("context", "/etc"),
    ("dockerfile", "../Dockerfile"),
])
def test_build_paths_must_stay_inside_the_repository(project: Project, key: str,
                                                     value: str) -> None:
    project.write_config(BASE_CONFIG.replace("build:\n  dockerfile: app/Dockerfile\n",
                                             f"build:\n  {key}: '{value}'\n"))
    assert f"build.{key} must be a path inside the repository" in only_problem(project)


def test_semantic_problems_are_reported_together(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace("blue: 9081", "blue: 9080")
                         .replace("build:\n", "build:\n  strategy: registry\n  context: ../x\n")
                         + "database:\n  migration_tool: custom\n")
    text = "\n".join(problems_of(project))
    for fragment in ("ports", "build.registry", "build.context", "migration_command"):
        assert fragment in text


def test_schema_and_secrets_problems_are_reported_at_once(project: Project) -> None:
    project.write_config(BASE_CONFIG + "colour: blue\n")
    project.write_env("staging", JWT_SECRET="CHANGE_ME")
    text = "\n".join(problems_of(project))
    assert "'colour'" in text
    assert "JWT_SECRET" in text


# --- the secrets file ---------------------------------------------------------------------


def test_missing_env_file_points_at_the_example(project: Project) -> None:
    env_file = project.env_path("staging")
    env_file.unlink()
    example = env_file.with_name(".env.staging.example")
    example.write_text("ENVIRONMENT=staging\nJWT_SECRET=CHANGE_ME\n")
    problem = only_problem(project)
    assert str(env_file) in problem
    assert str(example) in problem
    assert "chmod 600" in problem


def test_missing_env_file_without_an_example(project: Project) -> None:
    env_file = project.env_path("staging")
    env_file.unlink()
    problem = only_problem(project)
    assert str(env_file) in problem
    assert ".example" not in problem


@pytest.mark.parametrize("key", ["ENVIRONMENT", "DATABASE_URL", "JWT_SECRET", "ADMIN_API_KEY"])
def test_missing_required_variable(project: Project, key: str) -> None:
    project.write_env("staging", **{key: None})
    problem = only_problem(project)
    assert f"{key} is missing" in problem
    assert str(project.env_path("staging")) in problem


def test_empty_required_variable(project: Project) -> None:
    project.write_env("staging", JWT_SECRET="")
    assert "JWT_SECRET is missing or empty" in only_problem(project)


def test_change_me_in_a_value_is_rejected(project: Project) -> None:
    project.write_env("staging", ADMIN_API_KEY="prefix-CHANGE_ME-suffix")
    problem = only_problem(project)
    assert "ADMIN_API_KEY" in problem
    assert "CHANGE_ME" in problem


def test_change_me_in_a_database_url_is_one_problem(project: Project) -> None:
    project.write_env("staging", DATABASE_URL="CHANGE_ME")
    assert "placeholder" in only_problem(project)


def test_change_me_in_comments_is_accepted(project: Project) -> None:
    project.write_env("staging", "# JWT_SECRET=CHANGE_ME (template)\n"
                                 "ENVIRONMENT=staging\n"
                                 f"DATABASE_URL={DB_URL}\n"
                                 f"JWT_SECRET={JWT_SECRET} # was CHANGE_ME\n"
                                 f"ADMIN_API_KEY='{ADMIN_API_KEY}'  # CHANGE_ME before prod\n")
    s = project.load("staging")
    assert s.secrets["JWT_SECRET"] == JWT_SECRET
    assert s.secrets["ADMIN_API_KEY"] == ADMIN_API_KEY


def test_environment_mismatch(project: Project) -> None:
    project.write_env("staging", ENVIRONMENT="production")
    problem = only_problem(project)
    assert "ENVIRONMENT='production'" in problem
    assert "--env=staging" in problem


@pytest.mark.parametrize("env", ["staging", "production"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_env_file_is_rejected_outside_development(project: Project, env: str,
                                                           mode: int) -> None:
    path = project.write_env(env, mode=mode)
    problem = only_problem(project, env)
    assert f"mode {mode:03o}" in problem
    assert f"chmod 600 {path}" in problem


def test_mode_problem_fix_survives_redaction(project: Project) -> None:
    path = project.write_env("staging", mode=0o644)
    assert f"run `chmod 600 {path}`" in only_problem(project)


def test_readable_env_file_is_only_a_warning_for_development(project: Project) -> None:
    path = project.write_env("development", mode=0o644)
    s = project.load("development")
    assert len(s.warnings) == 1
    assert "mode 644" in s.warnings[0]
    assert str(path) in s.warnings[0]


@pytest.mark.parametrize("url, fragment", [
    ("mysql://app:pw@db/app", "postgres://"),
    ("https://app:pw@db/app", "postgres://"),
    ("postgres://db.internal/app", "USER"),
    ("postgres://app:pw@db.internal", "USER"),
    ("postgres://app:pw@db:notaport/app", "not a valid URL"),
])
def test_database_url_must_be_a_postgres_url(project: Project, url: str, fragment: str) -> None:
    project.write_env("staging", DATABASE_URL=url)
    problem = only_problem(project)
    assert "DATABASE_URL" in problem
    assert fragment in problem


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_both_postgres_schemes_are_accepted(project: Project, scheme: str) -> None:
    project.write_env("staging", DATABASE_URL=f"{scheme}://app:pw12-long@db/app")
    assert project.load().secrets["DATABASE_URL"].startswith(scheme)


def test_unparsable_env_line_is_reported_with_its_line_number(project: Project) -> None:
    project.write_env("staging", "ENVIRONMENT=staging\nthis line is not valid\n"
                                 f"DATABASE_URL={DB_URL}\nJWT_SECRET={JWT_SECRET}\n"
                                 f"ADMIN_API_KEY={ADMIN_API_KEY}\n")
    problem = only_problem(project)
    assert "line 2" in problem
    assert "cannot parse" in problem


def test_unparsable_line_content_is_not_echoed_or_logged(project: Project,
                                                         caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    project.write_env("staging", env_text_with("broken line leaked-secret-text-42\n"))
    problems = problems_of(project)
    captured = capsys.readouterr()
    everything = "\n".join(problems) + caplog.text + captured.out + captured.err
    assert "leaked-secret-text-42" not in everything


def test_several_secrets_problems_are_reported_at_once(project: Project) -> None:
    project.write_env("staging", mode=0o644, ENVIRONMENT="production", JWT_SECRET=None,
                      ADMIN_API_KEY="CHANGE_ME", DATABASE_URL="mysql://a:b@c/d")
    problems = problems_of(project)
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for fragment in ("mode 644", "JWT_SECRET is missing", "ADMIN_API_KEY still holds",
                     "ENVIRONMENT='production'", "DATABASE_URL: must start"):
        assert fragment in text


def test_config_error_exit_code_is_10(project: Project) -> None:
    project.write_env("staging", JWT_SECRET=None)
    with pytest.raises(ConfigError) as info:
        project.load()
    assert info.value.exit_code == ExitCode.CONFIG_ERROR == 10


def test_secrets_never_appear_in_config_error_text(project: Project) -> None:
    """ENVIRONMENT (not itself a secret) holding a pasted DATABASE_URL is quoted in its
    problem; the password must still be masked, and no other secret may show."""
    project.write_env("staging", mode=0o644, ENVIRONMENT=DB_URL,
                      DATABASE_URL=DB_URL.replace("postgres://", "mysql://"))
    with pytest.raises(ConfigError) as info:
        project.load()
    text = str(info.value)
    assert "ENVIRONMENT=" in text
    for secret in (DB_PASSWORD, DB_URL.split("@")[0].split(":")[-1], JWT_SECRET, ADMIN_API_KEY):
        assert secret not in text


# --- the --env argument -------------------------------------------------------------------


@pytest.mark.parametrize("env", [None, ""])
def test_missing_env_is_a_usage_error(env: str | None) -> None:
    with pytest.raises(UsageError) as info:
        check_env_name(env)
    assert info.value.exit_code == ExitCode.INVALID_ARGUMENTS == 2
    assert "--env is required" in info.value.message


@pytest.mark.parametrize("env", ["Staging", "q_a", "../staging", "x-anchor", "9lives",
                                 "a" * 32, "eu prod"])
def test_unsafe_env_name_is_a_usage_error(env: str) -> None:
    with pytest.raises(UsageError) as info:
        check_env_name(env)
    assert info.value.exit_code == 2
    assert repr(env) in info.value.message


@pytest.mark.parametrize("env", ["development", "staging", "production", "qa", "eu-prod",
                                 "preview-42", "a" * 31])
def test_safe_env_names_pass(env: str) -> None:
    assert check_env_name(env) == env


def test_load_settings_checks_the_env_name_first(project: Project) -> None:
    with pytest.raises(UsageError):
        project.load("../qa")



@pytest.mark.parametrize(("key", "value"), [
    ("JWT_SECRET", "short7!"),
    ("ADMIN_API_KEY", "abc"),
    ("SMTP_PASSWORD", "1234567"),
    ("DATABASE_URL", "postgres://app:pw12@db/app"),
    ("DEPLOY_DATABASE_URL", "postgres://app:%41%42%43%44%45%46%47@db/app"),
])
def test_a_secret_shorter_than_8_characters_is_refused(project: Project, key: str,
                                                       value: str) -> None:
    project.write_env("staging", **{key: value})
    problems = problems_of(project)
    assert len(problems) == 1, problems
    assert f"{key} is too short for a secret (fewer than 8 characters" in problems[0]
    assert value not in problems[0]


def test_short_values_that_are_not_secrets_are_accepted(project: Project) -> None:
    project.write_env("staging", LOG_LEVEL="info", PORT="80",
                      DATABASE_URL="postgres://app@db/app")
    assert project.load().secrets["LOG_LEVEL"] == "info"


@pytest.mark.parametrize(("remote_dir", "snapshot_dir", "problem"), [
    ("//", None, "remote_dir: must not be the root directory"),
    ("/srv/./", None, None),
    ("/srv/../etc", None, "remote_dir: must not contain `..`"),
    ("/srv/app", "../../etc", "snapshot_dir: must not contain `..`"),
    ("/srv/app", "/etc", "snapshot_dir: /etc is outside the remote directory"),
    ("/srv/app", "/srv/app", "snapshot_dir: /srv/app is outside the remote directory"),
    ("/srv/app", "/srv/application", "is outside the remote directory"),
    ("/srv/app", "/srv/app/backups", None),
    ("/srv/app", "backups/db", None),
])
def test_remote_and_snapshot_directories_stay_in_their_place(
        project: Project, remote_dir: str, snapshot_dir: str | None, problem: str | None) -> None:
    text = BASE_CONFIG.replace("remote_dir: /srv/togather/staging", f"remote_dir: '{remote_dir}'")
    if snapshot_dir:
        text += f"database:\n  snapshot_dir: '{snapshot_dir}'\n"
    project.write_config(text)
    if problem is None:
        project.load()
    else:
        problems = problems_of(project)
        assert len(problems) == 1 and problem in problems[0], problems


def test_the_registry_image_is_built_here_unless_told_otherwise(project: Project) -> None:
    assert project.load().build["registry_build"] == "local"
    project.write_config(BASE_CONFIG.replace("build:\n", "build:\n  registry_build: first-host\n"))
    assert project.load().build["registry_build"] == "first-host"


def test_registry_credentials_go_together(project: Project) -> None:
    project.write_env("staging", DEPLOY_REGISTRY_USERNAME="ci-deployer")
    problem = only_problem(project)
    assert "DEPLOY_REGISTRY_USERNAME and DEPLOY_REGISTRY_PASSWORD go together" in problem


def test_an_environment_the_config_does_not_define_is_a_usage_error_alone(
        project: Project) -> None:
    """A typo in --env names the defined environments; the secrets file it would need is not
    reported on top (it follows from the typo)."""
    with pytest.raises(UsageError) as info:
        project.load("prod")
    assert info.value.exit_code == 2
    assert info.value.message == ("unknown environment 'prod': config/deployment.yml defines "
                                  "staging, production")


def test_a_config_without_a_usual_environment_is_incomplete_not_a_bad_argument(
        project: Project) -> None:
    project.write_config(BASE_CONFIG.split("  production:")[0])
    with pytest.raises(ConfigError) as info:
        project.load("production")
    assert info.value.exit_code == 10
    assert "environments.production is not defined" in info.value.message
