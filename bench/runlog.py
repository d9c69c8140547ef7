"""Reading the CLI's JSON-lines run log (TOGATHER_LOG_DIR/<env>_<stamp>.log): step durations,
and where each step's time went per host (the `command` events carry host and seconds).

Shared by bench/deploy_timing.py and the fleet benchmarks. Only the log's documented events are
read (step_start, step_done, step_failed, command), so the scripts work whatever shape the
deploy operation has inside (sequential today, parallel hosts tomorrow: then the per-host sums
of one step add up to more than the step's wall time, which is the point).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SSH_CONNECTIONS = re.compile(r"ssh connections: (\d+)")
TRAFFIC_AFTER = re.compile(r"traffic on \S+ \(([^)]*)\) after ([\d.]+) ?s")
# Commands of the one-off image build + push (`registry` strategy, built here or on a host):
# the part of the build step a deploy of an image already in the registry does not have.
PUBLISH_COMMAND = re.compile(r"\bdocker (?:--config \S+ )?(?:build|push)\b")


@dataclass
class HostSteps:
    """One step's commands on one host: total seconds and how many round trips."""

    seconds: float = 0.0
    commands: int = 0


@dataclass
class RunLog:
    path: Path
    steps: dict[str, float] = field(default_factory=dict)  # step -> wall seconds (done)
    failed: dict[str, float] = field(default_factory=dict)
    # step -> host -> HostSteps (commands outside any step under "-")
    per_host: dict[str, dict[str, HostSteps]] = field(default_factory=dict)
    publish_s: float = 0.0  # seconds of `docker build` / `docker push` commands (any host)
    commands: list[dict] = field(default_factory=list)
    # host -> {"connections", "commands", "files"}: the session's count at the end of the run
    round_trips: dict[str, dict[str, int]] = field(default_factory=dict)
    first_at: datetime | None = None  # the first and the last event's time stamp
    last_at: datetime | None = None

    @property
    def hosts(self) -> list[str]:
        return sorted({h for per in self.per_host.values() for h in per})

    def host_total(self, host: str) -> HostSteps:
        total = HostSteps()
        for per in self.per_host.values():
            if host in per:
                total.seconds += per[host].seconds
                total.commands += per[host].commands
        return total

    def table(self, indent: str = "    ") -> str:
        """Step wall time, then seconds/round trips per host, one line per step."""
        hosts = self.hosts
        head = f"{indent}{'step':<10}{'wall_s':>8}  " + "  ".join(f"{h:>22}" for h in hosts)
        lines = [head, f"{indent}{'':<10}{'':>8}  "
                 + "  ".join(f"{'cmd_s / round trips':>22}" for _ in hosts)]
        order = list(self.steps) + [s for s in self.per_host if s not in self.steps]
        for step in order:
            per = self.per_host.get(step, {})
            wall = self.steps.get(step, self.failed.get(step))
            cells = []
            for h in hosts:
                hs = per.get(h)
                cells.append(f"{hs.seconds:>14.2f} / {hs.commands:>3}" if hs else f"{'-':>22}")
            wall_text = f"{wall:8.2f}" if wall is not None else f"{'-':>8}"
            lines.append(f"{indent}{step:<10}{wall_text}  " + "  ".join(f"{c:>22}" for c in cells))
        totals = [self.host_total(h) for h in hosts]
        lines.append(f"{indent}{'total':<10}{sum(self.steps.values()):8.2f}  " + "  ".join(
            f"{t.seconds:>14.2f} / {t.commands:>3}" for t in totals))
        return "\n".join(lines)


def read(path: Path) -> RunLog:
    log = RunLog(path)
    current = "-"
    per_host: dict[str, dict[str, HostSteps]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if "ts" in event:
            at = datetime.fromisoformat(event["ts"])
            log.first_at = log.first_at or at
            log.last_at = at
        if kind == "round_trips":
            log.round_trips = event.get("hosts") or {}
        elif kind == "step_start":
            current = event["step"]
        elif kind == "step_done":
            log.steps[event["step"]] = float(event["seconds"])
            current = "-"
        elif kind == "step_failed":
            log.failed[event["step"]] = float(event["seconds"])
            current = "-"
        elif kind == "command":
            host = str(event.get("host", "?"))
            seconds = float(event.get("seconds") or 0.0)
            hs = per_host[current].setdefault(host, HostSteps())
            hs.seconds += seconds
            hs.commands += 1
            command = str(event.get("command", ""))
            if PUBLISH_COMMAND.search(command):
                log.publish_s += seconds
            log.commands.append({"step": current, "host": host, "seconds": seconds,
                                 "command": command})
    log.per_host = dict(per_host)
    return log


def newest(log_dir: Path, env: str, before: set[Path], operation: str = "deploy") -> RunLog:
    """The run log of `operation` in `env` written since `before` (a set of paths)."""
    pattern = f"{env}_*.log" if operation == "deploy" else f"{env}_{operation}_*.log"
    new = sorted(p for p in set(log_dir.glob(pattern)) - before
                 if operation != "deploy" or not re.match(rf"{env}_[a-z]", p.name))
    if not new:
        raise FileNotFoundError(f"no new {operation} run log in {log_dir}")
    return read(new[-1])


def step_seconds(log_dir: Path, env: str, before: set[Path]) -> tuple[dict[str, float], Path]:
    """Step durations from the newest deploy run log written since `before`."""
    log = newest(log_dir, env, before)
    return log.steps, log.path


def ssh_connections(output: str) -> int | None:
    match = SSH_CONNECTIONS.search(output)
    return int(match[1]) if match else None


def traffic_after(output: str) -> float | None:
    """A rollback's "traffic on SLOT (VERSION) after X s" -> X."""
    match = TRAFFIC_AFTER.search(output)
    return float(match[2]) if match else None
