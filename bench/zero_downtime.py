"""Zero-downtime benchmark on the real test bed (TESTBED.md): one run, about two minutes.

It deploys a throwaway copy of examples/demo to the `staging` environment (over SSH to the
`togather-testbed` alias) under a unique name, ports, remote directory and PostgreSQL database,
then measures keep-alive load through the nginx proxy while:

  (a) `inv deploy --env=staging` of a new commit (v1 -> v2),
  (b) `inv rollback --env=staging` (v2 -> v1),
  (c) the baseline most teams use instead: `docker compose up -d --force-recreate` of the
      active app service in place with another image (expected to fail requests),

and times `inv health --env=staging` and `inv --list`. It prints a table and the targets with
PASS/FAIL, and always exits 0 unless the setup itself failed (it is a benchmark, not a test).
Everything it creates is removed at the end (compose project, database, remote directory,
images of its commits, temporary repository).

    .venv/bin/python bench/zero_downtime.py [--min-requests 20000] [--workers 16]

Run as root (it creates a database with `runuser -u postgres` and reads the host's files);
loopback only; every wait and every load run is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from loadgen import LoadResult, run_during

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo"
TESTBED_ENV_FILE = DEMO / "config" / "environments" / ".env.staging"
INV = Path(sys.executable).parent / "inv"
ENV = "staging"
SSH_ALIAS = "togather-testbed"
REMOTE_BASE = "/srv/togather"
PORT_RANGE = (20000, 29999)  # below the ephemeral range, so no client socket holds one
COMMAND_TIMEOUT = 600
ROLLBACK_MARGIN_S = 3.0
HEALTH_TARGET_S = 1.0
LIST_TARGET_S = 0.5
STEP_LINE = re.compile(r"^\[\d+/\d+\]\s+(\w+)\s+([\d.]+)s\s+(.*)$")


class SetupError(Exception):
    """The benchmark could not prepare or drive the test bed (exit 2)."""


@dataclass
class Command:
    argv: list[str]
    returncode: int
    lines: list[tuple[float, str]]  # (seconds since the start, output line)
    started: float  # time.monotonic() just before the process was spawned
    wall_s: float

    @property
    def output(self) -> str:
        return "".join(line + "\n" for _, line in self.lines)

    def tail(self, lines: int = 25) -> str:
        return "\n".join("    " + line for _, line in self.lines[-lines:])

    def steps(self) -> dict[str, tuple[float, str]]:
        """The CLI's progress lines: step name -> (seconds, note)."""
        found = {}
        for _, line in self.lines:
            if match := STEP_LINE.match(line.strip()):
                found[match.group(1)] = (float(match.group(2)), match.group(3))
        return found

    def timed_steps(self) -> str:
        """The progress lines, each with when it was printed (seconds since the start)."""
        return "\n".join(f"    t={at:5.2f}s  {line.strip()}" for at, line in self.lines
                         if STEP_LINE.match(line.strip()))


def run(argv: list[str], *, cwd: Path | str = "/", timeout: float = COMMAND_TIMEOUT,
        stdin: str | None = None, env: dict[str, str] | None = None) -> Command:
    """Run a command, stdout and stderr merged, each line time-stamped as it arrives; killed
    (by its own pid) when it outlives `timeout`."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines: list[tuple[float, str]] = []
    try:
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    if wall >= timeout:
        raise SetupError(f"`{' '.join(argv[:4])}` did not finish within {timeout:g} s")
    return Command(argv, returncode, lines, started, wall)


def must(command: Command, what: str) -> Command:
    if command.returncode != 0:
        raise SetupError(f"{what} failed (exit {command.returncode}):\n{command.tail()}")
    return command


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def free_ports(count: int) -> list[int]:
    """Distinct ports in PORT_RANGE that nothing listens on, chosen at random."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randint(*PORT_RANGE)
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))  # noqa: S104 - probing that the port is free
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise SetupError("no free ports found")


def read_env_file(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path, interpolate=False).items()}


def env_line(key: str, value: str) -> str:
    if "'" not in value and "\n" not in value:
        return f"{key}='{value}'"
    return f'{key}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class BenchApp:
    """A throwaway copy of examples/demo deployed to the staging test bed under its own name
    (`bench-<hex>`), compose project, ports, remote directory and database."""

    workdir: Path
    env: str = ENV
    secrets_file: Path = TESTBED_ENV_FILE  # the test bed's env file, copied with our database
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    ports: dict[str, int] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    created_db: bool = False
    engine: str = "haproxy"  # proxy.engine (the product's default)

    @property
    def name(self) -> str:
        return f"bench-{self.tag}"

    @property
    def project(self) -> str:
        return f"{self.name}-{self.env}"

    @property
    def database(self) -> str:
        return f"bench_{self.tag}"

    @property
    def repo(self) -> Path:
        return self.workdir / "repo"

    @property
    def remote_dir(self) -> str:
        return f"{REMOTE_BASE}/{self.name}/{self.env}"

    @property
    def load_port(self) -> int:
        """The loopback port the load goes through (the app's proxy here)."""
        return self.ports["proxy"]

    def pick_ports(self) -> dict[str, int]:
        return dict(zip(("proxy", "blue", "green"), free_ports(3), strict=True))

    def environment(self) -> dict:
        """The one environment of the throwaway deployment.yml."""
        return {"hosts": [SSH_ALIAS], "remote_dir": self.remote_dir, "ports": dict(self.ports),
                "public_url": f"http://127.0.0.1:{self.ports['proxy']}"}

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        import yaml

        self.ports = self.pick_ports()
        # Without the checkout's real env files (`.env.<name>`, any name, `.env.cluster` too):
        # only the committed `.example` templates; this app writes its own below.
        shutil.copytree(DEMO, self.repo, ignore=lambda _dir, names: {
            n for n in names if n in ("__pycache__", ".git")
            or (n.startswith(".env.") and not n.endswith(".example"))})
        self.log_dir.mkdir()
        config_path = self.repo / "config" / "deployment.yml"
        document = yaml.safe_load(config_path.read_text())
        document["app"]["name"] = self.name
        document["proxy"] = {**(document.get("proxy") or {}), "bind": "127.0.0.1",
                             "engine": self.engine}
        document["environments"] = {self.env: self.environment()}
        config_path.write_text("# written by a bench/ script (throwaway)\n"
                               + yaml.safe_dump(document, sort_keys=False))
        values = read_env_file(self.secrets_file)
        role = unquote(urlsplit(values.get("DATABASE_URL", "")).username or "")
        if not role:
            raise SetupError(f"{self.secrets_file}: DATABASE_URL names no role")
        for key in ("DATABASE_URL", "DEPLOY_DATABASE_URL"):
            if values.get(key):
                values[key] = urlunsplit(urlsplit(values[key])._replace(
                    path=f"/{self.database}"))
        env_file = self.repo / "config" / "environments" / f".env.{self.env}"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(env_line(k, v) + "\n" for k, v in values.items()))
        self.psql(f"CREATE DATABASE {quote_ident(self.database)} OWNER {quote_ident(role)};")
        self.created_db = True
        for args in (("init", "--quiet", "-b", "main"),
                     ("config", "user.email", "bench@togather.invalid"),
                     ("config", "user.name", "togather bench"),
                     ("config", "commit.gpgsign", "false")):
            self.git(*args)
        self.commit("v1")

    def git(self, *args: str) -> str:
        return must(run(["git", *args], cwd=self.repo, timeout=60), f"git {args[0]}").output

    def commit(self, label: str) -> str:
        """Commit the tree with app/RELEASE = label (so each version builds its own image);
        returns the short SHA the tool tags the image with."""
        (self.repo / "app" / "RELEASE").write_text(f"{label}\n")
        self.git("add", "-A")
        self.git("commit", "--quiet", "-m", f"bench {label}")
        sha7 = self.git("rev-parse", "--short=7", "HEAD").strip()
        self.commits.append(sha7)
        return sha7

    def psql(self, sql: str) -> str:
        """SQL from stdin as the postgres superuser (never on a command line)."""
        return must(run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t",
                         "-v", "ON_ERROR_STOP=1", "-d", "postgres"], stdin=sql, timeout=60),
                    "psql").output

    # -- driving it ------------------------------------------------------------------------

    def inv(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> Command:
        env = {**os.environ, "TOGATHER_LOG_DIR": str(self.log_dir)}
        return run([str(INV), *args], cwd=self.repo, timeout=timeout, env=env)

    def compose_argv(self, *args: str) -> list[str]:
        root = self.remote_dir
        return ["docker", "compose", "-p", self.project, "--project-directory", root,
                "-f", f"{root}/compose.yml", "--env-file", f"{root}/slots.env", *args]

    def compose(self, *args: str, timeout: float = 300) -> Command:
        return run(self.compose_argv(*args), timeout=timeout)

    def status(self) -> dict:
        out = must(self.inv("status", f"--env={self.env}", "--json", timeout=120),
                   "inv status")
        return json.loads(out.output[out.output.index("{"):])

    def container_ip(self, slot: str) -> str:
        """The slot container's address on the project network ('-' when there is none)."""
        ids = run(self.compose_argv("ps", "--quiet", f"app-{slot}"), timeout=60).output.split()
        if not ids:
            return "-"
        out = run(["docker", "inspect", "--format", "{{range .NetworkSettings.Networks}}"
                   "{{.IPAddress}} {{end}}", ids[0]], timeout=60)
        return out.output.strip() or "-"

    def set_slot_image(self, slot: str, image: str) -> None:
        """Edit <remote_dir>/slots.env in place (owner and mode stay the deploy user's)."""
        path = Path(self.remote_dir) / "slots.env"
        key = f"{slot.upper()}_IMAGE="
        lines = path.read_text().splitlines(keepends=True)
        if not any(line.startswith(key) for line in lines):
            raise SetupError(f"{path} has no {key} line")
        path.write_text("".join(f"{key}{image}\n" if line.startswith(key) else line
                                for line in lines))

    # -- cleanup ---------------------------------------------------------------------------

    def drop_database(self) -> list[str]:
        """Drop the run's database (if it made one); the by-hand command when that failed."""
        drop = f"DROP DATABASE IF EXISTS {quote_ident(self.database)} WITH (FORCE);"
        if not self.created_db:
            return []
        try:
            ok = run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v",
                      "ON_ERROR_STOP=1", "-d", "postgres"], stdin=drop, timeout=300
                     ).returncode == 0
        except (SetupError, OSError):
            ok = False
        return [] if ok else [f"echo '{drop}' | runuser -u postgres -- psql -d postgres"]

    def cleanup(self, *, keep_workdir: bool = False) -> list[str]:
        """Remove everything the run created (its images included). Returns, for whatever
        could not be removed, the command that finishes the job by hand."""
        leftovers: list[str] = []

        def attempt(argv: list[str], stdin: str | None = None) -> bool:
            try:
                return run(argv, stdin=stdin, timeout=300).returncode == 0
            except (SetupError, OSError):
                return False

        down = ["down", "--remove-orphans", "--timeout", "5"]
        argv = (self.compose_argv(*down) if (Path(self.remote_dir) / "compose.yml").is_file()
                else ["docker", "compose", "-p", self.project, *down])
        if not attempt(argv):
            leftovers.append(f"docker compose -p {self.project} down --remove-orphans")
        leftovers += self.drop_database()
        images = [f"togather-server:{sha}" for sha in self.commits]
        if images:
            attempt(["docker", "image", "rm", *images])  # one in use elsewhere stays: fine
        top = Path(REMOTE_BASE) / self.name
        if re.fullmatch(r"bench-[0-9a-f]{8}", top.name) and top.exists():
            shutil.rmtree(top, ignore_errors=True)
            if top.exists():
                leftovers.append(f"rm -rf {top}")
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return leftovers


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Phase:
    label: str
    load: LoadResult
    command: Command
    wall_s: float


def under_load(app: BenchApp, label: str, argv: tuple[str, ...], args: argparse.Namespace, *,
               inv: bool = True, workers: int | None = None, min_requests: int | None = None,
               max_seconds: float | None = None) -> Phase:
    """Run `inv ARGV` (or the plain command ARGV) while the proxy is under load."""
    def action() -> Command:
        return app.inv(*argv) if inv else run(list(argv), timeout=COMMAND_TIMEOUT)

    load, command, wall = run_during(
        action, args.min_requests if min_requests is None else min_requests,
        port=app.load_port, workers=workers or args.workers,
        max_seconds=max_seconds or args.max_seconds)
    return Phase(label, load, command, wall)


def app_time_to_healthy(app: BenchApp, slot: str, runs: int = 3) -> float:
    """The app's own start-to-healthy time: `docker compose start` of the (stopped) slot, then
    poll its /health directly every 50 ms until HTTP 200 with status healthy. Median of `runs`;
    the slot is stopped again after each run."""
    port = app.ports[slot]
    times = []
    for _ in range(runs):
        started = time.monotonic()
        must(app.compose("start", f"app-{slot}", timeout=120), f"compose start app-{slot}")
        deadline = started + 60
        while True:
            if slot_is_healthy(port):
                times.append(time.monotonic() - started)
                break
            if time.monotonic() > deadline:
                raise SetupError(f"app-{slot} did not become healthy within 60 s")
            time.sleep(0.05)
        must(app.compose("stop", "--timeout", "10", f"app-{slot}", timeout=120),
             f"compose stop app-{slot}")
    return statistics.median(times)


def slot_is_healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status == 200 and json.loads(body).get("status") == "healthy"
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return False
    finally:
        conn.close()


def median_wall(app: BenchApp, args: tuple[str, ...], runs: int = 5) -> tuple[float, list[float]]:
    walls = []
    for _ in range(runs):
        walls.append(must(app.inv(*args, timeout=120), f"inv {' '.join(args)}").wall_s)
    return statistics.median(walls), walls


def first_response_after(load: LoadResult, version: str, since: float) -> float | None:
    """Seconds from `since` (a monotonic time) to the first 2xx response of `version`."""
    seen = [at for label, at in load.first_seen_s.items() if label.endswith(f"/{version}")]
    if not seen:
        return None
    return load.started_monotonic + min(seen) - since


# -- report ------------------------------------------------------------------------------------

COLUMNS = ("operation", "requests", "failed", "retried", "conn_err", "non_2xx", "p50_ms",
           "p99_ms", "rps", "wall_s")
WIDTHS = (34, 9, 7, 8, 9, 8, 7, 7, 6, 6)


def row(values: tuple) -> str:
    return "".join(f"{str(v):<{w}}" for v, w in zip(values, WIDTHS, strict=True)).rstrip()


def phase_row(phase: Phase) -> str:
    lr = phase.load
    return row((phase.label, lr.sent, lr.failed, lr.retried, lr.conn_errors, lr.non_2xx,
                f"{lr.p50_ms:.1f}", f"{lr.p99_ms:.1f}", f"{lr.rps:.0f}", f"{phase.wall_s:.1f}"))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def describe(phase: Phase) -> str:
    lr = phase.load
    lines = [f"{phase.label}: load {lr.duration_s:.1f} s, ended by {lr.stop_reason}; command "
             f"exit {phase.command.returncode}"]
    if lr.retry_reasons:
        lines.append(f"  retried (first attempt got no response): {lr.retry_reasons}")
    if lr.failure_reasons:
        lines.append(f"  failed: {lr.failure_reasons}")
    lines.append("  slot/version answering, per second of the load:")
    lines.append(lr.timeline())
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root")
    if not INV.exists():
        problems.append(f"{INV} not found (install the package in this interpreter's venv)")
    if not TESTBED_ENV_FILE.is_file():
        problems.append(f"{TESTBED_ENV_FILE} missing (start the test bed: make testbed)")
    for argv in (["docker", "info", "--format", "{{.ServerVersion}}"],
                 ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", SSH_ALIAS, "true"]):
        with contextlib.suppress(SetupError):
            if run(argv, timeout=30).returncode == 0:
                continue
        problems.append(f"`{' '.join(argv[:2])}` does not answer (start the test bed)")
    if problems:
        raise SetupError("; ".join(problems))


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through the normal `finally` (cleanup) path."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def benchmark(app: BenchApp, args: argparse.Namespace) -> list[str]:
    def say(text: str) -> None:
        print(text, flush=True)

    say(f"app {app.name}: proxy 127.0.0.1:{app.ports['proxy']}, slots {app.ports['blue']}/"
        f"{app.ports['green']}, remote dir {app.remote_dir}, database {app.database}")
    v1 = app.commits[0]
    first = must(app.inv("deploy", f"--env={ENV}"), "first deploy (v1)")
    say(f"first deploy of v1 {v1} without load: {first.wall_s:.1f} s")

    v2 = app.commit("v2")
    say(f"(a) inv deploy of v2 {v2} under load ...")
    a = under_load(app, "(a) inv deploy (v1 -> v2)", ("deploy", f"--env={ENV}"), args)
    must(a.command, "(a) inv deploy")

    say(f"(b) inv rollback to v1 {v1} under load ...")
    b = under_load(app, "(b) inv rollback (v2 -> v1)", ("rollback", f"--env={ENV}"), args)
    must(b.command, "(b) inv rollback")

    # The same measurement without saturating the 2 CPUs: one keep-alive client. A second
    # rollback returns to v2 (the rolled-back deployment is now the previous one).
    say(f"(b2) inv rollback again, to v2 {v2}, with a single client ...")
    b2 = under_load(app, "(b2) inv rollback, 1 client", ("rollback", f"--env={ENV}"), args,
                    workers=1, min_requests=0)
    must(b2.command, "(b2) inv rollback")

    active = app.status()["active_slot"]
    idle = "green" if active == "blue" else "blue"
    say(f"the app's own time to become healthy (start app-{idle}, poll its /health; median "
        "of 3) ...")
    healthy_s = app_time_to_healthy(app, idle)

    say("inv health and inv --list, 5 runs each ...")
    health_s, health_runs = median_wall(app, ("health", f"--env={ENV}"))
    list_s, list_runs = median_wall(app, ("--list",))

    other_image = f"togather-server:{v1}"
    say(f"(c) baseline: compose up --force-recreate of app-{active} with {other_image} under "
        "load ...")
    app.set_slot_image(active, other_image)
    ip_before = app.container_ip(active)
    c = under_load(app, "(c) compose up --force-recreate", tuple(app.compose_argv(
        "up", "-d", "--force-recreate", "--no-deps", f"app-{active}")), args, inv=False,
        max_seconds=min(args.max_seconds, args.baseline_seconds))
    must(c.command, "(c) docker compose up --force-recreate")
    ip_after = app.container_ip(active)

    phases = (a, b, b2, c)
    limit = healthy_s + ROLLBACK_MARGIN_S
    traffic = {p.label: first_response_after(p.load, version, p.command.started)
               for p, version in ((b, v1), (b2, v2))}

    def traffic_text(phase: Phase) -> str:
        value = traffic[phase.label]
        return "never (within the load)" if value is None else f"{value:.1f} s"

    def within(phase: Phase) -> bool:
        value = traffic[phase.label]
        return value is not None and value <= limit

    out = ["", row(COLUMNS), *(phase_row(p) for p in phases), "",
           f"inv health --env={ENV}: median {health_s:.2f} s (runs: "
           f"{', '.join(f'{w:.2f}' for w in health_runs)})",
           f"inv --list:               median {list_s:.2f} s (runs: "
           f"{', '.join(f'{w:.2f}' for w in list_runs)})",
           f"rollback: traffic on the previous version after {traffic_text(b)} (b, under load; "
           f"{traffic_text(b2)} in b2, one client) from the command's start",
           f"  the app's own time to become healthy: {healthy_s:.2f} s (docker compose start "
           "to the first healthy /health, polled every 50 ms)"]
    for phase in (b, b2):
        steps = phase.command.steps()
        out.append(f"  {phase.label}: start step {steps.get('start', ('-',))[0]} s, health "
                   f"gate {steps.get('health', ('-',))[0]} s; progress lines as printed "
                   "(t = since the command's start):")
        out.append(phase.command.timed_steps())
    targets = [
        (a.load.failed == 0, f"(a) deploy under load: 0 failed requests ({a.load.failed})"),
        (b.load.failed == 0 and b2.load.failed == 0,
         f"(b) rollback under load: 0 failed requests ({b.load.failed}; b2: "
         f"{b2.load.failed})"),
        (within(b), f"(b) traffic on the previous version within the app's health time + "
                    f"{ROLLBACK_MARGIN_S:.0f} s ({traffic_text(b)} <= {limit:.1f} s)"),
        (health_s < HEALTH_TARGET_S, f"inv health < {HEALTH_TARGET_S:g} s ({health_s:.2f} s)"),
        (list_s < LIST_TARGET_S, f"inv --list < {LIST_TARGET_S:g} s ({list_s:.2f} s)"),
    ]
    out += ["", "targets:", *(f"  {verdict(ok)}  {text}" for ok, text in targets)]
    out.append(f"  info  (b2) the same rollback with one client (CPUs not saturated by the "
               f"load): {traffic_text(b2)} ({verdict(within(b2))} against {limit:.1f} s)")
    out.append(f"  info  (c) baseline, compose --force-recreate in place: {c.load.failed} failed "
               f"of {c.load.sent} ({c.load.conn_errors} connection errors, {c.load.non_2xx} "
               "non-2xx); expected to fail requests")
    after_c = c.load.slots_seen[-1][1] if c.load.slots_seen else {}
    recovered = any(label.endswith(f"/{v1}") for label in after_c)
    out.append(f"        app-{active}'s container address {ip_before} -> {ip_after}; the proxy "
               + ("served the new container again by the end of the load" if recovered else
                  "never reached the new container within the load"))
    covered = all(p.load.started_monotonic + p.load.duration_s
                  >= p.command.started + p.command.wall_s for p in phases)
    enough = all(p.load.sent >= args.min_requests for p in (a, b))
    out.append(f"  {'ok  ' if covered and enough else 'WARN'}  the load covered every command "
               f"and sent >= {args.min_requests} requests in a and b ({a.load.sent}, "
               f"{b.load.sent}); slowest rate there {min(a.load.rps, b.load.rps):.0f} req/s "
               f"with {args.workers} keep-alive clients")
    out += ["", *(describe(p) for p in phases)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-requests", type=int, default=20000,
                        help="requests per measured operation (default 20000)")
    parser.add_argument("--workers", type=int, default=16, help="keep-alive clients")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="hard cap on each load run (default 300)")
    parser.add_argument("--baseline-seconds", type=float, default=60.0,
                        help="hard cap on the load of (c), whose proxy may never recover "
                             "(default 60)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temporary repository and run logs")
    args = parser.parse_args(argv)
    if args.min_requests < 1 or args.workers < 1:
        parser.error("--min-requests and --workers must be positive")

    app = BenchApp(Path(tempfile.mkdtemp(prefix="togather-bench-")))
    code = 0
    with terminate_as_exit():
        try:
            preflight()
            app.setup()
            print("\n".join(benchmark(app, args)))
        except SetupError as exc:
            print(f"benchmark setup failed: {exc}", file=sys.stderr)
            code = 2
        finally:
            leftovers = app.cleanup(keep_workdir=args.keep_workdir)
            if leftovers:
                print("cleanup incomplete; finish it by hand:\n  " + "\n  ".join(leftovers),
                      file=sys.stderr)
            if args.keep_workdir:
                print(f"kept {app.workdir}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
