"""Any app, not only Togather (issue 11), deployed for real on the staging test-bed host: a
plain HTTP app without a database (health mode http, its own required secrets), a free
environment name, migrations run inside the new image, and an app whose source is a folder of
the repository that holds the config (this repository's own layout)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

pytestmark = pytest.mark.e2e

# The demo's first layer, word for word, so the build reuses it from the cache.
PLAIN_DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update \\
    && apt-get install -y --no-install-recommends python3 python3-psycopg2 \\
    && rm -rf /var/lib/apt/lists/* \\
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
ARG VERSION=""
ENV VERSION=${VERSION}
COPY app/plain.py /app/plain.py
USER app
CMD ["python3", "-u", "/app/plain.py"]
"""

# No JSON contract: 204 on /up, the version as plain text on /release.
PLAIN_SERVER = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

assert os.environ["GREETING_TOKEN"], "the app's own required secret"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/up":
            self.send_response(204)
            self.end_headers()
            return
        body = (os.environ["VERSION"] + "\\n").encode() if self.path == "/release" else b"hi"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
"""

# A migration runner that lives in the image (like `rails db:migrate` or `alembic upgrade`):
# applies the dbmate-format files shipped in /app/migrations that schema_migrations lacks.
IMAGE_MIGRATOR = """\
import os
import pathlib
import psycopg2

conn = psycopg2.connect(os.environ["DATABASE_URL"])
with conn, conn.cursor() as cur:
    cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version varchar PRIMARY KEY)")
    cur.execute("SELECT version FROM schema_migrations")
    done = {row[0] for row in cur.fetchall()}
    for path in sorted(pathlib.Path("/app/migrations").glob("*.sql")):
        version = path.name.split("_", 1)[0]
        if version in done:
            continue
        up = path.read_text().split("-- migrate:down")[0].replace("-- migrate:up", "")
        cur.execute(up)
        cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        print("Applying:", path.name)
"""


def test_a_plain_http_app_without_a_database_deploys(demo_app) -> None:
    app = demo_app
    app.env_file.write_text("ENVIRONMENT=staging\nGREETING_TOKEN=greeting-0123456789abcdef\n")
    app.secrets = {"ENVIRONMENT": "staging", "GREETING_TOKEN": "greeting-0123456789abcdef"}
    app.write_config(
        app={"health_endpoint": "/up", "version_endpoint": "/release",
             "health": {"mode": "http"}, "required_secrets": ["GREETING_TOKEN"]},
        build={"dockerfile": "app/Dockerfile"},
        database={"migration_tool": "none"})
    sha = app.commit("a plain HTTP app", {"app/Dockerfile": PLAIN_DOCKERFILE,
                                          "app/plain.py": PLAIN_SERVER})[:7]

    result = app.deploy(check=True)
    assert re.search(r"snapshot .*skipped", result.stdout), result.stdout
    status, headers, body = app.get("/release")
    assert (status, body.strip(), headers.get("x-togather-slot")) == (200, sha, "blue")
    assert not (app.snapshot_dir.exists() and any(app.snapshot_dir.iterdir()))
    assert not (app.state_path.parent / ".pgpass").exists()
    health = app.inv("health", app.env_flag, "--expected-version", sha, "--json", check=True)
    assert json.loads(health.stdout)["status"] == "healthy"

    second = app.commit("second release")[:7]
    app.deploy(check=True)
    assert app.get("/release")[2].strip() == second
    app.assert_no_secrets()


def test_a_free_environment_name_deploys_on_the_staging_host(demo_app, monkeypatch) -> None:
    app = demo_app
    staging_host = app.host
    monkeypatch.setattr(type(app), "host", property(lambda _: staging_host))
    staging = app.base_config["environments"].pop("staging")
    app.base_config["environments"]["qa-1"] = staging
    app.env = "qa-1"
    app.secrets["ENVIRONMENT"] = "qa-1"
    app.env_file.write_text("".join(f"{k}='{v}'\n" for k, v in app.secrets.items()))
    app.env_file.chmod(0o600)
    app.write_config()
    sha = app.head[:7]

    app.deploy(check=True)
    # The package's schema (validated before every write); the original compat schema knows
    # only development, staging and production.
    state = app.state(validate=False)
    assert state["environment"] == "qa-1"
    assert state["current_deployment"]["version"] == sha
    snapshots = [p.name for p in app.snapshots()]
    assert snapshots and all(name.startswith("qa-1_") for name in snapshots), snapshots
    listed = json.loads(app.inv("db.snapshots", app.env_flag, "--json", check=True).stdout)
    assert [s["name"] for s in listed] == snapshots
    assert app.served()[1]["version"] == sha
    # The name is checked before anything else: unsafe names never reach a path or a host.
    bad = app.inv("deploy", "--env=qa_1")
    assert bad.returncode == 2 and "not a valid environment name" in bad.stderr


def test_migrations_run_inside_the_new_image(demo_app) -> None:
    app = demo_app
    app.write_config(database={"migration_tool": "command",
                               "migration_command": "python3 /app/migrate_in_image.py",
                               "migrations_path": "nowhere"})
    app.commit("migrations in the image", {"app/migrate_in_image.py": IMAGE_MIGRATOR})
    assert app.tables() == []

    result = app.deploy(check=True)
    assert "events" in app.tables() and "jobs" in app.tables()
    assert re.search(r"snapshot .*before the migration command", result.stdout), result.stdout
    assert len(app.snapshots()) == 1
    assert app.served()[1]["version"] == app.head[:7]
    # No container of the one-off run is left behind.
    assert {c["service"] for c in app.containers()} == {"app-blue", "proxy"}
    app.assert_no_secrets()


def test_an_app_in_a_folder_of_the_config_repository_deploys(demo_app) -> None:
    """This repository's own layout: config/ at the top, the app in examples/demo."""
    app = demo_app
    folder = app.path / "examples" / "demo"
    folder.mkdir(parents=True)
    for name in ("app", "db"):
        shutil.move(app.path / name, folder / name)
    app.write_config(app={"source": "examples/demo"})
    sha = app.commit("the app moves into examples/demo")[:7]

    app.deploy(check=True)
    assert app.served()[1]["version"] == sha
    assert "events" in app.tables()
    release = app.state_path.parent / "releases" / sha
    assert (release / "app" / "Dockerfile").is_file() and not (release / "config").exists()
