"""Command lines and generated files: exact strings, quoting, and no secrets in them."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from togather_tasks import commands as cmd
from togather_tasks import proxy, snapshots
from togather_tasks.config import Settings

from .projects import ADMIN_API_KEY, DB_PASSWORD, JWT_SECRET, Project

PG_ENV = ("PGPASSFILE=/srv/togather/staging/.pgpass PGHOST=db.internal PGPORT=5433 "
          "PGUSER=togather_app PGDATABASE=togather_staging PGSSLMODE=require PGCONNECT_TIMEOUT=10")
URL_NO_PASSWORD = "postgres://togather_app@db.internal:5433/togather_staging?sslmode=require"
SECRET_FORMS = [DB_PASSWORD, quote(DB_PASSWORD, safe=""), JWT_SECRET, ADMIN_API_KEY]


def with_database(settings: Settings, **database: object) -> Settings:
    return dataclasses.replace(settings, database={**settings.database, **database})


def with_url(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, secrets={**settings.secrets, "DATABASE_URL": url})


def every_command(settings: Settings) -> list[str]:
    return [
        cmd.compose(settings, "up", "-d", "app-blue"),
        cmd.pg_env(settings),
        cmd.passwordless_url(settings),
        cmd.migrate_command(settings, "/srv/togather/staging/releases/abc1234/db/migrations"),
        cmd.migrate_command(with_database(settings, migration_tool="golang-migrate"), "/m"),
        cmd.migrate_command(with_database(settings, migration_tool="custom",
                                          migration_command="./migrate.sh up"), "/m"),
        cmd.snapshot_command(settings, "/srv/togather/staging/snapshots/s.dump"),
        cmd.restore_command(settings, "/srv/togather/staging/snapshots/s.dump", "scratch"),
        cmd.dirty_check_command(settings),
        cmd.slots_env(settings, {"blue": "togather-server:abc1234"}),
        cmd.read_routes(cmd.Layout(settings.remote_dir)),
        cmd.mark_slot(cmd.Layout(settings.remote_dir), "green"),
        cmd.proxy_files(settings),
        proxy.site_conf(settings),
    ]


# --- docker compose and nginx -----------------------------------------------------------------


def test_compose_command_is_exact(settings: Settings) -> None:
    assert cmd.compose(settings, "up", "-d", "--no-deps", "app-blue") == (
        "docker compose --project-name togather-test-staging "
        "--project-directory /srv/togather/staging "
        "--file /srv/togather/staging/compose.yml "
        "--env-file /srv/togather/staging/slots.env up -d --no-deps app-blue")


COMPOSE = ("docker compose --project-name togather-test-staging --project-directory "
           "/srv/togather/staging --file /srv/togather/staging/compose.yml --env-file "
           "/srv/togather/staging/slots.env")
# A service's containers by Compose's labels (docker ps: no project to load).
PROJECT = "--filter label=com.docker.compose.project=togather-test-staging"
SERVICE = "label=com.docker.compose.service"
NOT_ONE_OFF = "--filter label=com.docker.compose.oneoff=False"
PS = f"docker ps --quiet {PROJECT}"


@pytest.mark.parametrize(("build", "expected"), [
    (lambda st: cmd.start_slot(st, "green", "never"),
     f"{COMPOSE} up --detach --no-deps --pull never app-green"),
    (lambda st: cmd.stop_slot(st, "blue"),
     f"ids=$({PS} --filter {SERVICE}=app-blue {NOT_ONE_OFF}); "
     '[ -z "$ids" ] || docker stop --time 30 $ids > /dev/null'),
    (lambda st: cmd.slot_container_ids(st, "blue"),
     f"docker ps --quiet --all {PROJECT} --filter {SERVICE}=app-blue {NOT_ONE_OFF}"),
    (lambda st: cmd.slot_logs(st, "green"),
     f"{COMPOSE} logs --no-color --tail 15 app-green"),
    (lambda st: cmd.start_proxy(st),
     f'PROXY_CGROUP_PARENT="$({cmd.PROXY_CGROUP_PROBE})" {COMPOSE} up --detach --no-deps proxy'),
    (lambda st: cmd.start_proxy(st, recreate=True),
     f'PROXY_CGROUP_PARENT="$({cmd.PROXY_CGROUP_PROBE})" '
     f"{COMPOSE} up --detach --no-deps --force-recreate proxy"),
    (lambda st: cmd.reload_proxy(st),
     f"id=$({PS} --filter {SERVICE}=proxy {NOT_ONE_OFF} | head -n 1); "
     '[ -n "$id" ] || { echo "the proxy container is not running" >&2; exit 1; }; '
     "docker exec \"$id\" sh -c 'nginx -t -q && nginx -s reload'"),
    (lambda st: cmd.running_proxy(st),
     f"id=$({PS} --filter {SERVICE}=proxy {NOT_ONE_OFF} | head -n 1); [ -z \"$id\" ] || "
     "{ docker inspect --format '{{.Config.Image}} {{.HostConfig.NetworkMode}} workers="
     "{{range .Config.Env}}{{if eq (index (split . \"=\") 0) \"TOGATHER_NGINX_WORKERS\"}}"
     "{{index (split . \"=\") 1}}{{end}}{{end}} cgroup={{.HostConfig.CgroupParent}}' \"$id\""
     f" | tr -d '\\n'; printf ' own=%s\\n' \"$({cmd.PROXY_CGROUP_PROBE})\"; }}"),
    (lambda st: cmd.proxy_files(st),
     f"docker ps --all {PROJECT} {NOT_ONE_OFF} "
     "--format '{{.Label \"com.docker.compose.service\"}} {{.Networks}}'; echo --; "
     "printf '%s\\n' \"$(cat /srv/togather/staging/nginx/site.loaded 2>/dev/null)\"; "
     "cat /srv/togather/staging/nginx/verify.map 2>/dev/null; echo --; "
     "cat /srv/togather/staging/nginx/site.conf 2>/dev/null; true"),
], ids=["start", "stop", "ps", "logs", "proxy-up", "proxy-recreate", "reload", "running-proxy",
        "proxy-files"])
def test_slot_and_proxy_commands_are_exact(settings: Settings, build, expected: str) -> None:
    assert build(settings) == expected


@pytest.mark.parametrize(("command", "expected"), [
    (cmd.container_state("c0ffee"),
     "docker inspect --format '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' c0ffee"),
    (cmd.image_exists("togather-proxy:abc"),
     "docker image inspect togather-proxy:abc > /dev/null 2>&1"),
    (cmd.build_proxy_image("togather-proxy:abc", "/srv/it's/proxy"),
     "docker build --quiet -t togather-proxy:abc '/srv/it'\"'\"'s/proxy'"),
    (cmd.image_tags("togather-server"), "docker image ls --format '{{.Tag}}' togather-server"),
    (cmd.remove_image("togather-server:abc1234"), "docker image rm togather-server:abc1234"),
    (cmd.make_dirs("/srv/a", "/srv/b c"), "mkdir -p /srv/a '/srv/b c'"),
    (cmd.read_file("/srv/a b/slots.env"), "cat '/srv/a b/slots.env' 2>/dev/null || true"),
    (cmd.list_dir("/srv/releases"), "ls -1 /srv/releases 2>/dev/null || true"),
    (cmd.remove_files("/srv/x.partial", "/srv/$y"), "rm -f /srv/x.partial '/srv/$y'"),
    (cmd.remove_trees("/srv/releases/abc1234"), "rm -rf /srv/releases/abc1234"),
], ids=["container-state", "image-exists", "proxy-build", "image-tags", "image-rm", "mkdir",
        "cat", "ls", "rm", "rm-rf"])
def test_host_commands_are_exact_and_quoted(command: str, expected: str) -> None:
    assert command == expected


def test_compose_quotes_the_remote_directory(settings: Settings) -> None:
    odd = dataclasses.replace(settings, remote_dir="/srv/it's here")
    assert shlex.split(cmd.compose(odd, "ps"))[4:9] == [
        "--project-directory", "/srv/it's here", "--file", "/srv/it's here/compose.yml",
        "--env-file"]


def test_layout_paths(settings: Settings) -> None:
    layout = cmd.Layout(settings.remote_dir)
    assert layout.upstream_file == "/srv/togather/staging/nginx/upstream/active.conf"
    assert layout.proxy_conf_dir == "/srv/togather/staging/nginx"
    assert layout.site_file == "/srv/togather/staging/nginx/site.conf"
    assert layout.verify_map == "/srv/togather/staging/nginx/verify.map"
    assert layout.slot_marker("green") == "/srv/togather/staging/nginx/state/green"
    assert layout.maintenance_link == "/srv/togather/staging/nginx/state/maintenance"
    assert layout.pgpass == "/srv/togather/staging/.pgpass"
    assert layout.app_env == "/srv/togather/staging/app.env"
    assert layout.release("abc1234") == "/srv/togather/staging/releases/abc1234"


def test_image_ref(settings: Settings) -> None:
    assert cmd.image_ref(settings, "abc1234") == "togather-server:abc1234"


def test_proxy_image_is_tagged_by_content() -> None:
    assert re.fullmatch(r"togather-proxy:[0-9a-f]{12}", cmd.proxy_image_ref("nginx"))
    assert cmd.proxy_image_ref("nginx") == cmd.proxy_image_ref("nginx")


def test_slots_env_content(settings: Settings) -> None:
    text = cmd.slots_env(settings, {"blue": "togather-server:abc1234"})
    assert text.endswith("\n")
    assert cmd.parse_env_lines(text) == {
        "COMPOSE_PROJECT_NAME": "togather-test-staging",
        "APP_PORT": "8080",
        "BLUE_IMAGE": "togather-server:abc1234",
        "GREEN_IMAGE": "togather-server:none",
        "BLUE_PORT": "9081",
        "GREEN_PORT": "9082",
        "EDGE_SUBNET": "10.201.27.200/29",
        "BLUE_EDGE_ADDRESS": "10.201.27.202",
        "GREEN_EDGE_ADDRESS": "10.201.27.203",
        "PROXY_IMAGE": cmd.proxy_image_ref("nginx"),
        "PROXY_WORKERS": "",
        "STOP_GRACE_PERIOD": "30s",
        "LOG_MAX_SIZE": "10m",
        "LOG_MAX_FILE": "5",
    }


@pytest.mark.parametrize("text, expected", [
    ("A=1\nB=two words\n", {"A": "1", "B": "two words"}),
    ("# comment=no\n\nA=1\n", {"A": "1"}),
    ("URL=postgres://u@h/db?a=b\n", {"URL": "postgres://u@h/db?a=b"}),
    ("  SPACED = value  \n", {"SPACED": "value"}),
    ("no equals sign\n=novalue\n", {}),
    ("A=1\nA=2\n", {"A": "2"}),
    ("", {}),
])
def test_parse_env_lines(text: str, expected: dict[str, str]) -> None:
    assert cmd.parse_env_lines(text) == expected


# --- the remote directory ---------------------------------------------------------------------


def test_the_remote_directories_are_created_closed_to_others_and_the_root_is_closed() -> None:
    layout = cmd.Layout("/srv/togather/my app")
    root = "'/srv/togather/my app"
    assert cmd.host_directories(layout) == (
        f"umask 027 && mkdir -p {root}' {root}/releases' {root}/proxy' && "
        f"chmod o-rwx {root}' && umask 027 && "
        f"mkdir -p {root}/nginx/state' {root}/nginx/state/pages' && "
        # nginx's workers test the markers: the mounted directories let them through.
        f"chmod 755 {root}/nginx' {root}/nginx/state' {root}/nginx/state/pages'")


def test_the_maintenance_commands_are_exact() -> None:
    layout = cmd.Layout("/srv/togather/staging")
    state = "/srv/togather/staging/nginx/state"
    assert cmd.maintenance_on(layout, "1765000000000000000-r60") == (
        f"ln -sfn pages/1765000000000000000-r60 {state}/.maintenance.new && "
        f"mv -fT {state}/.maintenance.new {state}/maintenance && "
        f"find {state}/pages -mindepth 1 -maxdepth 1 ! -name 1765000000000000000-r60 "
        "-exec rm -rf {} +")
    assert cmd.maintenance_off(layout) == (
        f"rm -f {state}/maintenance && {{ find {state}/pages -mindepth 1 -maxdepth 1 "
        "-exec rm -rf {} + 2>/dev/null || true; }")


# --- snapshots ---------------------------------------------------------------------------------


def test_snapshot_name_is_exact() -> None:
    name = snapshots.snapshot_name("staging", "20261126T181500Z", "abc1234")
    assert name == "staging_20261126T181500Z_abc1234.dump"
    match = snapshots.SNAPSHOT_RE.match(name)
    assert match and (match["env"], match["ts"], match["sha"]) == (
        "staging", "20261126T181500Z", "abc1234")


def test_snapshot_command_verifies_before_renaming(settings: Settings) -> None:
    path = "/srv/togather/staging/snapshots/staging_20261126T181500Z_abc1234.dump"
    command = cmd.snapshot_command(settings, path)
    assert command.startswith("umask 077 && mkdir -p /srv/togather/staging/snapshots && ")
    assert f"{PG_ENV} pg_dump --no-password --format=custom" in command
    assert f"--file={path}.partial" in command
    dump, verify, rename = (command.index("pg_dump"), command.index("pg_restore --list"),
                            command.index(f"ln {path}.partial {path}"))
    assert dump < verify < rename


def test_a_snapshot_never_replaces_one_of_the_same_name(settings: Settings,
                                                        tmp_path: Path) -> None:
    """Two snapshots in one second (a restore's safety snapshot right after `db.snapshot`):
    the second is refused with SNAPSHOT_NAME_TAKEN, the first keeps its content, no partial
    file is left. Real sh, stand-ins for pg_dump and pg_restore."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pg_dump").write_text(
        '#!/bin/sh\nfor a; do case "$a" in --file=*) printf "%s" "$DUMP" > "${a#--file=}";; '
        "esac; done\n")
    (bin_dir / "pg_restore").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("pg_dump", "pg_restore"):
        (bin_dir / tool).chmod(0o755)
    path = tmp_path / "snaps" / "staging_20261126T181500Z_abc1234.dump"
    command = cmd.snapshot_command(settings, str(path))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    first = subprocess.run(["sh", "-c", command], env={**env, "DUMP": "kept"},
                           capture_output=True, text=True, timeout=30)
    second = subprocess.run(["sh", "-c", command], env={**env, "DUMP": "lost"},
                            capture_output=True, text=True, timeout=30)

    assert first.returncode == 0 and first.stdout.strip() == "4", first.stderr
    assert second.returncode == cmd.SNAPSHOT_NAME_TAKEN, second.stderr
    assert path.read_text() == "kept"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_restore_command_replaces_the_schemas_and_replays_in_one_transaction(
        settings: Settings) -> None:
    path = "/srv/togather/staging/snapshots/x y.dump"
    command = cmd.restore_command(settings, path)
    bash, option, pipefail, dash_c, script = shlex.split(command)
    assert (bash, option, pipefail, dash_c) == ("bash", "-o", "pipefail", "-c")
    assert script == (
        f"{{ printf '%s\\n' 'BEGIN;' {shlex.quote(cmd.RESET_SCHEMAS_SQL)} && "
        "pg_restore --no-owner --exit-on-error --file=- '/srv/togather/staging/snapshots/x y.dump'"
        " && printf '%s\\n' 'COMMIT;'; } | "
        f"{PG_ENV} psql --no-password -X -q -v ON_ERROR_STOP=1 --dbname=togather_staging "
        "> /dev/null")
    assert "--dbname=scratch " in cmd.restore_command(settings, path, "scratch")


def test_reset_sql_drops_only_the_roles_own_schemas_and_recreates_public() -> None:
    sql = cmd.RESET_SCHEMAS_SQL
    assert "pg_has_role(nspowner, 'USAGE')" in sql
    assert "nspname NOT LIKE 'pg\\_%'" in sql and "nspname <> 'information_schema'" in sql
    assert "DROP SCHEMA %I CASCADE" in sql
    assert "CREATE SCHEMA public AUTHORIZATION %s" in sql
    assert "aclexplode(s.nspacl)" in sql


# --- the database connection without its password -----------------------------------------------


def test_pg_env_is_exact_and_has_no_password(settings: Settings) -> None:
    assert cmd.pg_env(settings) == PG_ENV


def test_pg_env_uses_the_deploy_database_url(settings: Settings) -> None:
    s = dataclasses.replace(settings, secrets={
        **settings.secrets, "DEPLOY_DATABASE_URL": "postgres://admin:pw99@127.0.0.1/other"})
    assert "PGHOST=127.0.0.1 PGPORT=5432 PGUSER=admin PGDATABASE=other" in cmd.pg_env(s)


def test_passwordless_url_is_exact(settings: Settings) -> None:
    assert cmd.passwordless_url(settings) == URL_NO_PASSWORD


def test_passwordless_url_quotes_user_and_database(settings: Settings) -> None:
    s = with_url(settings, "postgresql://app%20user:pw%40x@db/my%20db%2Fx")
    assert cmd.passwordless_url(s) == "postgres://app%20user@db:5432/my%20db%2Fx?sslmode=prefer"


def test_passwordless_url_keeps_ipv6_brackets(settings: Settings) -> None:
    s = with_url(settings, "postgres://app:pw12@[::1]:5432/app")
    assert cmd.passwordless_url(s) == "postgres://app@[::1]:5432/app?sslmode=prefer"


TLS_URL = ("postgres://app:pw12@db/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fdb%2Fca.pem"
           "&sslcert=/etc/db/client.crt&sslkey=/etc/db/client.key&sslpassword=k3y-s3cret"
           "&application_name=deploy&connect_timeout=5")


def test_pg_env_carries_the_urls_tls_settings(settings: Settings) -> None:
    """Issue 8 item 13: without PGSSL* pg_dump/psql/pg_restore fell back to `prefer`."""
    assert cmd.pg_env(with_url(settings, TLS_URL)) == (
        "PGPASSFILE=/srv/togather/staging/.pgpass PGHOST=db PGPORT=5432 PGUSER=app "
        "PGDATABASE=app PGSSLMODE=verify-full PGCONNECT_TIMEOUT=5 "
        "PGSSLROOTCERT=/etc/db/ca.pem PGSSLCERT=/etc/db/client.crt "
        "PGSSLKEY=/etc/db/client.key PGAPPNAME=deploy")


def test_pg_env_defaults_to_libpqs_sslmode(settings: Settings) -> None:
    assert cmd.pg_env(with_url(settings, "postgres://app:pw12@db/app")).endswith(
        "PGDATABASE=app PGSSLMODE=prefer PGCONNECT_TIMEOUT=10")


def test_pg_env_quotes_tls_values(settings: Settings) -> None:
    s = with_url(settings, "postgres://app:pw12@db/app?sslrootcert=%2Fmy%20certs%2F%24x.pem")
    assert "PGSSLROOTCERT='/my certs/$x.pem'" in cmd.pg_env(s)


def test_tls_settings_reach_the_migration_tool_without_secrets(settings: Settings) -> None:
    command = cmd.migrate_command(with_url(settings, TLS_URL), "/m")
    assert ("--url 'postgres://app@db:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fdb"
            "%2Fca.pem&sslcert=/etc/db/client.crt&sslkey=/etc/db/client.key"
            "&application_name=deploy&connect_timeout=5'") in command
    assert "PGSSLMODE=verify-full" in command
    assert "k3y-s3cret" not in command


def test_password_in_the_url_query_stays_off_the_command_line(settings: Settings) -> None:
    s = with_url(settings, "postgres://app@db/app?password=qu3ry-s3cret&sslmode=disable")
    assert "qu3ry-s3cret" not in cmd.migrate_command(s, "/m")


@pytest.mark.parametrize("url, line", [
    ("postgres://app:simple@db:5432/app", "db:5432:app:app:simple\n"),
    ("postgres://app:a%3Ab%5Cc@db/app", "db:5432:app:app:a\\:b\\\\c\n"),
    ("postgres://us%3Aer:pw@db/d%3Ab", "db:5432:d\\:b:us\\:er:pw\n"),
    ("postgres://app:pw@[::1]:6432/app", "\\:\\:1:6432:app:app:pw\n"),
])
def test_pgpass_line_escapes_colon_and_backslash(url: str, line: str) -> None:
    assert cmd.pgpass_line(url) == line


def test_pgpass_line_holds_the_decoded_password(settings: Settings) -> None:
    assert cmd.pgpass_line(settings.migrate_database_url) == (
        "db.internal:5433:togather_staging:togather_app:p@ss\\:w%rd/s3cr3t\n")


# --- migrations --------------------------------------------------------------------------------


def test_dbmate_command_is_exact(settings: Settings) -> None:
    assert cmd.migrate_command(settings, "/srv/r/db/migrations") == (
        f"{PG_ENV} timeout --kill-after=10 300 dbmate --url '{URL_NO_PASSWORD}' "
        "--migrations-dir /srv/r/db/migrations --no-dump-schema --wait --wait-timeout 10s up")


def test_golang_migrate_command_is_exact(settings: Settings) -> None:
    s = with_database(settings, migration_tool="golang-migrate", migration_timeout=120)
    assert cmd.migrate_command(s, "/srv/r/db/migrations") == (
        f"{PG_ENV} timeout --kill-after=10 120 migrate -path /srv/r/db/migrations "
        f"-database '{URL_NO_PASSWORD}' up")


def test_custom_migration_command_is_quoted(settings: Settings) -> None:
    s = with_database(settings, migration_tool="custom",
                      migration_command="./bin/migrate --to 'latest' && echo $PGHOST")
    command = cmd.migrate_command(s, "/srv/r/it's db")
    assert command == (f"cd '/srv/r/it'\"'\"'s db' && {PG_ENV} timeout --kill-after=10 300 "
                       "sh -c './bin/migrate --to '\"'\"'latest'\"'\"' && echo $PGHOST'")
    assert shlex.split(command)[-1] == "./bin/migrate --to 'latest' && echo $PGHOST"


def test_no_migration_command_for_tool_none(settings: Settings) -> None:
    with pytest.raises(ValueError):
        cmd.migrate_command(with_database(settings, migration_tool="none"), "/m")


@pytest.mark.parametrize("tool, binary", [
    ("dbmate", "dbmate"), ("golang-migrate", "migrate"), ("custom", None), ("none", None)])
def test_migration_tool_binary(tool: str, binary: str | None) -> None:
    assert cmd.migration_tool_binary(tool) == binary


DBMATE_OUTPUT = """\
Waiting for database...
Applying: 20260101000001_create_events.sql
Applied: 20260101000001_create_events.sql in 12.3ms
Applying: 20260102000000_add_index.sql
Applied: 20260102000000_add_index.sql in 4.1ms
"""
MIGRATE_OUTPUT = """\
20260101000001/u create_events (12.3ms)
20260102000000/u add_index (20.1ms)
20260103000000/u add_column (3.2ms)
"""


@pytest.mark.parametrize("tool, output, count", [
    ("dbmate", DBMATE_OUTPUT, 2),
    ("dbmate", "Waiting for database...\n", 0),
    ("dbmate", MIGRATE_OUTPUT, 0),
    ("golang-migrate", MIGRATE_OUTPUT, 3),
    ("golang-migrate", "no change\n", 0),
    ("golang-migrate", DBMATE_OUTPUT, 0),
    ("golang-migrate", "20260101000001/d drop (1ms)\n", 0),
    ("custom", DBMATE_OUTPUT, 0),
])
def test_count_applied(tool: str, output: str, count: int) -> None:
    assert cmd.count_applied(tool, output) == count


def test_dirty_check_command(settings: Settings) -> None:
    command = cmd.dirty_check_command(settings)
    assert shlex.quote("SELECT to_regclass('schema_migrations') IS NOT NULL") in command
    assert shlex.quote("SELECT version, dirty FROM schema_migrations LIMIT 1") in command
    temp_env = PG_ENV.replace("PGPASSFILE=/srv/togather/staging/.pgpass", 'PGPASSFILE="$f"')
    assert f"{temp_env} psql --no-password -X -A -t -v ON_ERROR_STOP=1" in command
    # The password arrives on stdin into a temporary file that is removed on exit.
    assert command.startswith("f=$(mktemp) && trap 'rm -f \"$f\"' EXIT && cat > \"$f\"")


def test_dirty_check_reads_the_password_from_stdin_and_leaves_nothing(tmp_path) -> None:
    """Run the real script's preamble with a stand-in for psql's part: the file holds what
    came on stdin while the command runs and is gone afterwards."""
    from togather_tasks.hosts import LocalHost
    script = ("f=$(mktemp) && trap 'rm -f \"$f\"' EXIT && cat > \"$f\" && "
              "stat -c %a \"$f\" && cat \"$f\" && echo \"$f\"")
    import io
    result = LocalHost().stream_into(script, io.BytesIO(b"h:5432:db:u:pw\n"), timeout=10)
    mode, content, path = result.stdout.split("\n")[:3]
    assert (mode, content) == ("600", "h:5432:db:u:pw")
    assert not Path(path).exists()


# --- secrets never in a command line --------------------------------------------------------------


def test_no_secret_in_any_generated_command(settings: Settings) -> None:
    for command in every_command(settings):
        for secret in SECRET_FORMS:
            assert secret not in command, (secret, command)


def test_no_password_in_commands_for_a_deploy_database_url(project: Project) -> None:
    project.write_env("staging", DEPLOY_DATABASE_URL="postgres://admin:d3ploy%2Fpw@10.0.0.5/db")
    s = project.load("staging")
    for command in every_command(s):
        assert "d3ploy" not in command


# --- app.env for docker compose -------------------------------------------------------------------


def compose_closing_quote(quoted: str) -> int:
    """Where Compose's env-file parser (compose-go dotenv) ends a quoted value: at the first
    quote character that a backslash does not escape (a backslash escapes the next character,
    itself included; checked against Compose 2.40 for both quote kinds)."""
    i = 1
    while i < len(quoted):
        if quoted[i] == "\\":
            i += 2
            continue
        if quoted[i] == quoted[0]:
            return i
        i += 1
    return -1


@pytest.mark.parametrize("value, written", [
    ("plain", "'plain'"),
    ("", "''"),
    ("$HOME ${X} $(id) `id` \"dq\"", "'$HOME ${X} $(id) `id` \"dq\"'"),
    ("back\\slash $X", '"back\\\\slash $$X"'),
    ("it's", '"it\'s"'),
    ("it's $HOME", '"it\'s $$HOME"'),
    ("line1\nline2", '"line1\\nline2"'),
    ("cr\r\nlf", '"cr\\r\\nlf"'),
    ("it's \"x\" \\ y", '"it\'s \\"x\\" \\\\ y"'),
    ("ünï ✓", "'ünï ✓'"),
])
def test_dotenv_quote(value: str, written: str) -> None:
    assert cmd.dotenv_quote(value) == written


@pytest.mark.parametrize("value", [
    "plain",
    "it's \"quoted\"",
    "a\\b",
    "multi\nline's",
    "ends-with-backslash\\",
    "it's\\",
])
def test_dotenv_quote_ends_where_compose_ends_it(value: str) -> None:
    written = cmd.dotenv_quote(value)
    assert compose_closing_quote(written) == len(written) - 1


def test_app_env_file_is_sorted_and_quoted() -> None:
    assert cmd.app_env_file({"B": "it's", "A": "x y", "C": "$(id)"}) == (
        "A='x y'\nB=\"it's\"\nC='$(id)'\n")


def test_app_env_file_has_one_line_per_variable_even_for_multiline_values() -> None:
    text = cmd.app_env_file({"KEY": "-----BEGIN-----\nabc\n-----END-----", "N": "1"})
    assert text.count("\n") == 2


# --- the registry strategy --------------------------------------------------------------------

REMOTE = "registry.example.com:5000/team/togather-server:abc1234"
BY_DIGEST = "registry.example.com:5000/team/togather-server@sha256:" + "ab" * 32


def test_registry_ref_appends_the_image_to_build_registry(settings: Settings) -> None:
    settings = dataclasses.replace(settings, build={**settings.build,
                                                    "registry": "registry.example.com:5000/team/"})
    assert cmd.registry_ref(settings, "abc1234") == REMOTE


@pytest.mark.parametrize(("ref", "registry"), [
    (REMOTE, "registry.example.com:5000"), ("localhost/app:1", "localhost"),
    ("127.0.0.1:5000/app:1", "127.0.0.1:5000"), ("team/app:1", "docker.io"),
    ("app:1", "docker.io")])
def test_registry_host_follows_dockers_rule(ref: str, registry: str) -> None:
    assert cmd.registry_host(ref) == registry


def test_digest_ref_drops_the_tag_but_keeps_the_registry_port() -> None:
    assert cmd.digest_ref(REMOTE, "sha256:" + "ab" * 32) == BY_DIGEST
    assert cmd.digest_ref("127.0.0.1:5000/app", "sha256:1") == "127.0.0.1:5000/app@sha256:1"


def test_parse_push_digest_takes_the_last_digest_line() -> None:
    output = ("The push refers to repository [registry.example.com:5000/team/togather-server]\n"
              "5f70bf18a086: Layer already exists\n"
              f"abc1234: digest: sha256:{'cd' * 32} size: 1570\n")
    assert cmd.parse_push_digest(output) == "sha256:" + "cd" * 32
    assert cmd.parse_push_digest("denied: requested access to the resource is denied") is None


def test_docker_config_dir_commands_are_exact() -> None:
    assert cmd.docker_config_dir_command("/srv/togather/my app") == (
        "mkdir -p '/srv/togather/my app' && rm -rf '/srv/togather/my app/.docker-config.'* && "
        "mktemp -d '/srv/togather/my app/.docker-config.XXXXXXXX'")
    assert cmd.docker_config_dir_command(None) == "mktemp -d -t togather-docker-config.XXXXXXXX"


def test_docker_login_reads_user_and_password_from_stdin() -> None:
    assert cmd.docker_login_command("/srv/x/.docker-config.Ab12", "registry.example.com:5000") \
        == ("IFS= read -r user && DOCKER_CONFIG=/srv/x/.docker-config.Ab12 docker login "
            '--username "$user" --password-stdin registry.example.com:5000')


def test_docker_push_and_pull_commands_are_exact() -> None:
    assert cmd.docker_push_command("togather-server:abc1234", REMOTE, None) == (
        f"docker tag togather-server:abc1234 {REMOTE} && docker push {REMOTE}")
    assert cmd.docker_pull_command(BY_DIGEST, "togather-server:abc1234", "/d") == (
        f"DOCKER_CONFIG=/d docker pull --quiet {BY_DIGEST} && "
        f"docker tag {BY_DIGEST} togather-server:abc1234")
    assert cmd.image_exists_command(BY_DIGEST) == (
        f"docker image inspect --format '{{{{.Id}}}}' {BY_DIGEST} > /dev/null")


COMPOSE = ("docker compose --project-name togather-test-staging "
           "--project-directory /srv/togather/staging "
           "--file /srv/togather/staging/compose.yml "
           "--env-file /srv/togather/staging/slots.env")
ONE_OFF = COMPOSE.replace("/compose.yml ",
                          "/compose.yml --file /srv/togather/staging/compose.oneoff.yml ")
UNTIL_INPUT_CLOSES = ('exec 3<&0; {} & pid=$!; { cat <&3 > /dev/null; kill "$pid"; } '
                      '> /dev/null 2>&1 & wait "$pid"')


def test_logs_command_is_exact(settings: Settings) -> None:
    assert cmd.logs_command(settings, "app-blue", lines=100) == (
        f"{COMPOSE} logs --no-color --no-log-prefix --tail 100 app-blue")
    assert cmd.logs_command(settings, "proxy", lines=5, since_seconds=600) == (
        f"{COMPOSE} logs --no-color --no-log-prefix --tail 5 --since 600s proxy")


def test_a_followed_log_ends_when_its_caller_goes_away(settings: Settings) -> None:
    followed = f"{COMPOSE} logs --no-color --no-log-prefix --tail 100 --follow app-green"
    assert cmd.logs_command(settings, "app-green", lines=100, follow=True) == \
        UNTIL_INPUT_CLOSES.replace("{}", followed)


def test_until_input_closes_ends_a_quiet_command_when_stdin_closes() -> None:
    import subprocess
    import time
    proc = subprocess.Popen(["sh", "-c", cmd.until_input_closes("sleep 30")],
                            stdin=subprocess.PIPE)
    start = time.monotonic()
    proc.stdin.close()
    assert proc.wait(timeout=10) != 0
    assert time.monotonic() - start < 10


def test_until_input_closes_keeps_the_commands_exit_status() -> None:
    import subprocess
    # Standard input stays open while the command runs (closing it would stop the command,
    # which is the other test's point); it is closed only after the exit status is known.
    with subprocess.Popen(["sh", "-c", cmd.until_input_closes("exit 7")],
                          stdin=subprocess.PIPE) as proc:
        try:
            assert proc.wait(timeout=10) == 7
        finally:
            proc.stdin.close()


def test_exec_commands_are_exact_and_quote_the_operators_command(settings: Settings) -> None:
    operator = """echo "$HOME" 'it''s' && exit 3"""
    quoted = shlex.quote(operator)
    assert cmd.exec_command(settings, "blue", operator, one_off=True, interactive=False) == \
        UNTIL_INPUT_CLOSES.replace(
            "{}", f"{ONE_OFF} run --rm --no-deps -T app-blue sh -c {quoted}")
    assert cmd.exec_command(settings, "green", operator, one_off=False, interactive=True) == \
        f"{COMPOSE} exec app-green sh -c {quoted}"
    assert cmd.exec_command(settings, "blue", "id", one_off=True, interactive=True) == \
        f"{ONE_OFF} run --rm --no-deps app-blue sh -c id"


def test_audit_tail_command_is_exact() -> None:
    assert cmd.audit_tail_command("/srv/my app", 20) == (
        "if [ -e '/srv/my app/audit.log' ]; then tail -n 20 '/srv/my app/audit.log'; fi")


def test_log_rotation_reaches_slots_env(settings: Settings) -> None:
    rotated = dataclasses.replace(settings, deployment={
        **settings.deployment, "log_rotation": {"max_size": "50m", "max_files": 2}})
    values = cmd.parse_env_lines(cmd.slots_env(rotated, {}))
    assert (values["LOG_MAX_SIZE"], values["LOG_MAX_FILE"]) == ("50m", "2")


def test_compose_file_rotates_the_logs_of_every_service() -> None:
    import yaml
    document = yaml.safe_load((cmd.DOCKER_DIR / "compose.yml").read_text())
    for name, service in document["services"].items():
        assert service["logging"] == {"driver": "json-file", "options": {
            "max-size": "${LOG_MAX_SIZE:-10m}", "max-file": "${LOG_MAX_FILE:-5}"}}, name
