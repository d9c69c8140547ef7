"""Issue 8, database items end to end on the real test bed (staging over SSH): the URL's TLS
settings reach pg_dump and the migration tool (13), a failed migration shows the tool's own
error (24), and a deploy with no pending migration takes no snapshot (27).

The test bed's PostgreSQL runs without TLS, so `sslmode=require` must now fail: that proves the
setting is honoured (before, pg_dump silently connected in clear)."""

from __future__ import annotations

from conftest import DemoApp, assert_clean_failure

EXIT_MIGRATION = 5
SQL_ERROR = 'syntax error at or near "THIS"'
BAD_MIGRATION = {"db/migrations/20260201000000_bad.sql":
                 "-- migrate:up\nTHIS IS NOT SQL;\n-- migrate:down\n"}
GOOD_MIGRATION = {"db/migrations/20260201000000_notes.sql":
                  "-- migrate:up\nCREATE TABLE notes (id serial PRIMARY KEY);\n"
                  "-- migrate:down\nDROP TABLE notes;\n"}


def require_tls(app: DemoApp) -> None:
    """Ask for TLS in the URL pg_dump and the migrations use (the env file stays mode 600)."""
    text = app.env_file.read_text()
    assert "sslmode=disable" in text
    app.env_file.write_text(text.replace("sslmode=disable", "sslmode=require"))


def test_sslmode_require_reaches_pg_dump(demo_app: DemoApp) -> None:
    """`inv db.snapshot` is pg_dump alone: with sslmode=require against a server without TLS
    it must refuse to connect, not dump the database in clear."""
    demo_app.deploy(check=True)
    before = demo_app.snapshots()
    require_tls(demo_app)

    result = demo_app.inv("db.snapshot", demo_app.env_flag)

    assert_clean_failure(result, contains="snapshot failed")
    assert "SSL" in result.stderr, result.stderr
    assert demo_app.snapshots() == before
    demo_app.assert_no_secrets()
