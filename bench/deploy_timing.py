"""Where the time of a deploy goes, on the real test bed (staging over SSH).

A first deploy on an empty remote directory and database, then further deploys of new commits,
each split into: image build, waiting for the app to become healthy, the configured drain
before the old slot stops, and everything else (the tool's own overhead), with the SSH
connections opened and the remote commands run (each one a new session on the host). For the
last deploy, the overhead phase by phase (Python start-up, each step, exit), how much of it is
docker/compose commands on the host, and with --commands every remote command it ran. Then,
for what an empty *engine* would add, a build of the app image and of the proxy image with
--no-cache (skip with --no-cold).

    python bench/deploy_timing.py [--deploys 3] [--commands] [--no-cold] [--keep-workdir]

Prints figures; asserts nothing (it is a benchmark). Cleans up after itself.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runlog  # noqa: E402
from zero_downtime import BenchApp, SetupError, must, preflight, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Waiting that is the app's or the configuration's, not the tool's.
NOT_OVERHEAD = ("build", "health")
DOCKER_CLI = re.compile(r"\bdocker\b")


@dataclass
class Timed:
    label: str
    wall: float
    drain: float
    log: runlog.RunLog
    started_at: datetime  # wall clock just before the process was spawned

    @property
    def build(self) -> float:
        return self.log.steps.get("build", 0.0)

    @property
    def health(self) -> float:
        return self.log.steps.get("health", 0.0)

    @property
    def other(self) -> float:
        return self.wall - self.build - self.health - self.drain

    def count(self, what: str) -> int:
        if what == "commands" and not self.log.round_trips:  # a version that did not count
            return len(self.log.commands)
        return sum(host.get(what, 0) for host in self.log.round_trips.values())

    def phases(self) -> list[tuple[str, float]]:
        """The overhead phase by phase: start-up (process spawn to the first log line), each
        step less what is not overhead, the gaps between steps, and exit."""
        log = self.log
        rows: list[tuple[str, float]] = []
        if log.first_at and log.last_at:
            rows.append(("start-up (python, imports, config, git)",
                         (log.first_at - self.started_at).total_seconds()))
        for step, seconds in log.steps.items():
            if step in NOT_OVERHEAD:
                continue
            if step == "finish":
                seconds -= self.drain
            rows.append((f"step {step}" + (" (less the drain)" if step == "finish" else ""),
                         seconds))
        if log.first_at and log.last_at:
            ended = self.started_at.timestamp() + self.wall
            rows.append(("exit (after the last log line)", ended - log.last_at.timestamp()))
        accounted = sum(seconds for _, seconds in rows)
        rows.append(("between steps (hooks, audit, notifications)", self.other - accounted))
        return rows

    def split(self) -> tuple[float, float, float]:
        """The overhead as (seconds in remote commands that run the docker or compose CLI,
        seconds in the other remote commands, the rest: this machine's own time, SSH set-up
        and HTTP checks), outside the build and health steps."""
        docker = other = 0.0
        for c in self.log.commands:
            if c["step"] in NOT_OVERHEAD:
                continue
            if DOCKER_CLI.search(c["command"]):
                docker += c["seconds"]
            else:
                other += c["seconds"]
        return docker, other, self.other - docker - other


def timed_deploy(app: BenchApp, label: str, drain_seconds: float) -> Timed:
    before = set(app.log_dir.glob("*.log"))
    started_at = datetime.now(UTC)
    start = time.monotonic()
    must(app.inv("deploy", f"--env={app.env}", timeout=900), f"inv deploy ({label})")
    wall = time.monotonic() - start
    log = runlog.newest(app.log_dir, app.env, before)
    drain = drain_seconds if label != "first" else 0.0  # a first deploy has no old slot
    return Timed(label, wall, drain, log, started_at)


def cold_build_seconds(context: Path, dockerfile: str, tag: str) -> float:
    start = time.monotonic()
    must(run(["docker", "build", "--no-cache", "--quiet", "-t", tag, "-f",
              str(context / dockerfile), str(context)], timeout=900), f"docker build {tag}")
    seconds = time.monotonic() - start
    run(["docker", "image", "rm", tag], timeout=120)
    return seconds


def report(rows: list[Timed], show_commands: bool) -> list[str]:
    out = [f"{'deploy':<8} {'wall_s':>7} {'build_s':>8} {'health_s':>9} {'drain_s':>8} "
           f"{'other_s':>8} {'ssh':>4} {'cmds':>5} {'files':>6}"]
    for r in rows:
        out.append(f"{r.label:<8} {r.wall:7.2f} {r.build:8.2f} {r.health:9.2f} {r.drain:8.2f} "
                   f"{r.other:8.2f} {r.count('connections'):4d} {r.count('commands'):5d} "
                   f"{r.count('files'):6d}")
    later = [r.other for r in rows if r.label != "first"]
    if later:
        out.append(f"overhead of a deploy with an old slot (other_s): median "
                   f"{statistics.median(later):.2f} s, min {min(later):.2f} s, max "
                   f"{max(later):.2f} s over {len(later)}")
    out.append("other = wall - build - health - drain; cmds = remote commands (each a new "
               "session on the host), files = files written over SFTP")
    for r in rows:
        out.append(f"  {r.label} steps (s): "
                   + " ".join(f"{k}={v:.2f}" for k, v in r.log.steps.items()))
    last = rows[-1]
    out.append(f"where the overhead of the last deploy ({last.label}) goes:")
    out += [f"  {name:<46} {seconds:6.2f} s" for name, seconds in last.phases()]
    docker, other, here = last.split()
    out.append(f"  = {docker:.2f} s in docker/compose commands on the host (stopping the old "
               f"slot included) + {other:.2f} s in other remote commands + {here:.2f} s here "
               "(Python, git, SSH set-up, HTTP checks through the proxy)")
    out.append("remote commands per step (seconds on the host / commands):")
    out.append(last.log.table("  "))
    if show_commands:
        out.append("every remote command of the last deploy:")
        out += [f"  {c['step']:<9} {c['seconds']:6.3f}  {c['command'][:150]}"
                for c in last.log.commands]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploys", type=int, default=3,
                        help="deploys after the first, each of a new commit (default 3)")
    parser.add_argument("--commands", action="store_true",
                        help="list every remote command of the last deploy")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the --no-cache builds of the app and proxy images")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temporary repository and run logs")
    args = parser.parse_args(argv)
    if not 1 <= args.deploys <= 20:
        parser.error("--deploys takes 1 to 20")
    preflight()
    # Measured as installed: with PYTHONDONTWRITEBYTECODE set, every run would compile the
    # package's modules from source again (~0.15 s of start-up a user never pays).
    no_bytecode = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    app = BenchApp(Path(tempfile.mkdtemp(prefix="togather-timing-")))
    rows: list[Timed] = []
    cold: tuple[float, float] | None = None
    try:
        app.setup()
        import yaml
        config = yaml.safe_load((app.repo / "config" / "deployment.yml").read_text())
        drain = float(config["deployment"]["drain_seconds"])
        rows.append(timed_deploy(app, "first", drain))
        for number in range(2, args.deploys + 2):
            app.commit(f"v{number}")
            rows.append(timed_deploy(app, f"deploy{number}", drain))
        if not args.no_cold:
            cold = (cold_build_seconds(app.repo, "app/Dockerfile", "togather-timing:app"),
                    cold_build_seconds(REPO / "docker" / "nginx", "Dockerfile",
                                       "togather-timing:proxy"))
    except SetupError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        leftovers = app.cleanup(keep_workdir=args.keep_workdir)
        for line in leftovers:
            print(f"left over, remove by hand: {line}")
        if args.keep_workdir:
            print(f"kept {app.workdir}", file=sys.stderr)
    if no_bytecode:
        print("(PYTHONDONTWRITEBYTECODE was set: unset for the deploys, as an installed tool "
              "runs from cached bytecode)")
    print("\n".join(report(rows, args.commands)))
    if cold:
        print(f"cold builds on an empty engine (--no-cache): app image {cold[0]:.1f} s, "
              f"proxy image {cold[1]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
