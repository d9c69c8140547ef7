"""What the pre-migration snapshot costs on a large database (issue 8 item 27), on the real
test bed (staging over SSH).

A throwaway copy of the demo app is deployed, its database filled to about --size-mb (one
table of hex text from generate_series, filled in bounded batches until the size is reached),
then three deploys of new commits are timed:

- no pending migration, `database.snapshot: when-migrating` (the default): no dump;
- no pending migration, `database.snapshot: always` (what every deploy did before);
- one pending migration (default policy): dump, then migrate.

    python bench/snapshot_cost.py [--size-mb 2048]

Prints figures; asserts nothing (it is a benchmark). Cleans up after itself (database,
containers, remote directory with its snapshots, images).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zero_downtime import (  # noqa: E402
    ENV,
    TESTBED_ENV_FILE,
    BenchApp,
    SetupError,
    must,
    preflight,
    quote_ident,
    read_env_file,
    run,
)

ROWS_PER_BATCH = 1_000_000
MAX_BATCHES = 200  # a bound whatever the size asked: 200 M rows at most
# Only integers are formatted in.
FILL_SQL = ("INSERT INTO bench_filler SELECT g, md5(g::text) || md5((g + 1)::text) || "
            "md5((g + 2)::text) || md5((g + 3)::text) FROM generate_series({first}, {last}) "
            "AS g;\nSELECT pg_database_size(current_database());")
MIGRATION = ("-- migrate:up\nCREATE TABLE bench_notes (id serial PRIMARY KEY);\n"
             "-- migrate:down\nDROP TABLE bench_notes;\n")


def app_psql(app: BenchApp, sql: str, timeout: float = 900) -> str:
    """SQL in the app's database as its own role (so pg_dump, run as that role, can read
    what it creates), from stdin as the postgres superuser."""
    role = unquote(urlsplit(read_env_file(TESTBED_ENV_FILE)["DATABASE_URL"]).username or "")
    script = f"SET ROLE {quote_ident(role)};\n{sql}"
    return must(run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v",
                     "ON_ERROR_STOP=1", "-d", app.database], stdin=script, timeout=timeout),
                "psql").output.strip()


def fill(app: BenchApp, size_mb: int) -> int:
    """Grow the database to about `size_mb` MB in bounded batches; returns its size in bytes.
    Four md5s per row: hex text that compresses about as well as real data (2-3x)."""
    app_psql(app, "CREATE TABLE bench_filler (id bigint, payload text);")
    target = size_mb * 1024 * 1024
    size = 0
    for batch in range(MAX_BATCHES):
        first = batch * ROWS_PER_BATCH + 1
        last = first + ROWS_PER_BATCH - 1
        size = int(app_psql(app, FILL_SQL.format(first=first, last=last)).splitlines()[-1])
        print(f"  filled {size / 2**20:,.0f} MB", flush=True)
        if size >= target:
            break
    return size


def timed_deploy(app: BenchApp, label: str) -> dict[str, object]:
    start = time.monotonic()
    out = must(app.inv("deploy", f"--env={ENV}", timeout=3600), f"inv deploy ({label})")
    steps = out.steps()
    return {"label": label, "wall": time.monotonic() - start,
            "snapshot": steps.get("snapshot", (0.0, ""))[0],
            "migrate": steps.get("migrate", (0.0, ""))[0],
            "note": steps.get("snapshot", (0.0, ""))[1]}


def set_snapshot_policy(app: BenchApp, policy: str) -> None:
    """The deploy reads config/deployment.yml from the working tree: no commit needed."""
    import yaml
    path = app.repo / "config" / "deployment.yml"
    document = yaml.safe_load(path.read_text())
    document.setdefault("database", {})["snapshot"] = policy
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def measure(app: BenchApp, size_mb: int) -> tuple[int, list[dict[str, object]]]:
    app.setup()
    must(app.inv("deploy", f"--env={ENV}", timeout=900), "first deploy")
    size = fill(app, size_mb)
    rows = []
    app.commit("no migration")
    rows.append(timed_deploy(app, "no pending migration (when-migrating)"))
    set_snapshot_policy(app, "always")
    app.commit("no migration, snapshot always")
    rows.append(timed_deploy(app, "no pending migration (always: old behaviour)"))
    set_snapshot_policy(app, "when-migrating")
    (app.repo / "db" / "migrations" / "20990101000000_bench_notes.sql").write_text(MIGRATION)
    app.commit("one migration")
    rows.append(timed_deploy(app, "one pending migration"))
    return size, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=2048)
    args = parser.parse_args()
    try:
        preflight()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = BenchApp(Path(tempfile.mkdtemp(prefix="togather-snapcost-")))
    dumps: list[int] = []
    try:
        size, rows = measure(app, args.size_mb)
        dumps = [p.stat().st_size for p in
                 sorted((Path(app.remote_dir) / "snapshots").glob("*.dump"))]
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        leftovers = app.cleanup()
    print(f"database {size / 2**20:,.0f} MB; snapshots taken: "
          + ", ".join(f"{d / 2**20:,.1f} MB" for d in dumps))
    print(f"{'deploy':<46} {'wall_s':>7} {'snapshot_s':>10} {'migrate_s':>9}")
    for r in rows:
        print(f"{r['label']:<46} {r['wall']:7.1f} {r['snapshot']:10.1f} {r['migrate']:9.1f}")
    for line in leftovers:
        print(f"left over, remove by hand: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
