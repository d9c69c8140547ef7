"""The `swarm` engine of an environment (issue 12): the app as one Docker Swarm service.

The same runbook as a compose deploy where it can be the same (validate, the lock and state
file on the primary host, build once and push, snapshot and migrations once on the primary),
then one `docker service create/update` on the primary, which must be a swarm manager. Swarm
does the rolling: start-first, one task at a time, each task gated by its healthcheck (the
app's health endpoint), `failure_action: rollback` after a monitor period, so a task that never
becomes healthy is rolled back by the engine while the old tasks keep serving. The tool waits
for the update to converge (bounded), verifies the version on every task's node and through
the public URL, and records the deployment (image and digest) in the same state file.

Ports: Swarm's ingress routing mesh needs IPVS; the app's port (`ports.proxy`) is published in
host mode on the node of each task and a load balancer checks every node. Two tasks cannot bind
one host port on one node, so the service is replicated with at most one task per node and one
task fewer than there are nodes: start-first always finds a free node for the new task.

Secrets: the app's environment (the env file minus DEPLOY_*) becomes a Swarm secret (named by
its content's hash, created through standard input), mounted at /run/secrets/<SECRET_TARGET>
and read by a small `sh` wrapper before the image's own entrypoint: nothing secret is in the
service spec, on a command line or in `docker service inspect`.

Rollback returns to the previous deployment's image (or --to's) with the same update, not
`docker service rollback` (which only knows the spec before the last update).
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import requests

from . import commands as cmd
from . import fleet, images, registry, slots
from .config import Settings, app_environment
from .deploy import Deploy
from .errors import ConfigError, HealthCheckError, TogatherError
from .hosts import Host
from .logs import LogRequest, parse_duration, read_logs
from .operation import Release, Step
from .output import StepNote
from .rollback import Rollback, RollbackError
from .session import Session
from .slots import Slots
from .state import State, utc_now

q = shlex.quote

SECRET_TARGET = "togather-app-env"  # noqa: S105 - a file name in /run/secrets
LABEL = "com.togather.service"
# Reads the app's environment from the secret, then runs the image's own entrypoint and cmd.
WRAPPER = f'set -a; . /run/secrets/{SECRET_TARGET}; set +a; exec "$@"'
HEALTH_INTERVAL = 1
HEALTH_RETRIES = 3
HEALTH_START_PERIOD = 10
UPDATE_DELAY = 3  # between tasks: the load balancer's checks see the new node come up
MONITOR = 5  # a new task that fails within this is an update failure (engine rolls back)
POLL_SECONDS = 1.0
PUBLIC_CHECKS = 6
NODE_CHECK_SECONDS = 5.0  # a task that cannot be placed: how often the nodes are counted
PUBLIC_DEADLINE = 20.0


class SwarmError(TogatherError):
    """The swarm refused something (exit 1)."""


# --- pure builders ----------------------------------------------------------------------------


def service_name(settings: Settings) -> str:
    return settings.compose_project


def replicas(settings: Settings) -> int:
    """One node fewer than the environment's hosts (start-first needs a free node)."""
    return max(1, len(settings.hosts) - 1)


def update_order(settings: Settings, available: int | None = None) -> str:
    """start-first whenever a node is free for the new task (more nodes available than
    replicas: `available` Ready and Active nodes, default all the hosts); otherwise (one host,
    or a node drained or down) stop-first: one task at a time is replaced in place while the
    others serve, and the load balancer's checks and retries cover the gap."""
    nodes = len(settings.hosts) if available is None else available
    return "start-first" if nodes > replicas(settings) else "stop-first"


def secret_content(settings: Settings) -> bytes:
    """The app's environment as `KEY='value'` lines for the wrapper's `sh` (sorted, so the
    same secrets give the same content and the same secret name)."""
    env = app_environment(settings.secrets)
    return "".join(f"{k}={q(v)}\n" for k, v in sorted(env.items())).encode()


def secret_name(settings: Settings, content: bytes) -> str:
    return f"{service_name(settings)}-env-{hashlib.sha256(content).hexdigest()[:12]}"


def health_command(settings: Settings) -> str:
    """The task's healthcheck: the app's health endpoint on its own port, with whichever
    HTTP client the image has (curl, wget, else python3)."""
    url = f"http://127.0.0.1:{settings.app_port}{settings.health_endpoint}"
    timeout = max(1, int(settings.health.timeout))
    return (f"if command -v curl >/dev/null 2>&1; then curl -fsS -m {timeout} -o /dev/null "
            f"{q(url)}; elif command -v wget >/dev/null 2>&1; then wget -q -T {timeout} -O "
            f"/dev/null {q(url)}; else python3 -c 'import sys, urllib.request; "
            f"urllib.request.urlopen(sys.argv[1], timeout={timeout})' {q(url)}; fi")


def command_of(config: dict[str, Any]) -> list[str]:
    """The image's entrypoint + cmd (from `docker image inspect`'s Config)."""
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


def _common_flags(settings: Settings, order: str) -> list[str]:
    hc = settings.health
    return [
        "--detach", "--no-resolve-image",
        "--replicas", str(replicas(settings)), "--replicas-max-per-node", "1",
        "--update-order", order, "--update-parallelism", "1",
        "--update-delay", f"{UPDATE_DELAY}s", "--update-failure-action", "rollback",
        "--update-monitor", f"{MONITOR}s", "--update-max-failure-ratio", "0",
        "--rollback-order", order, "--rollback-parallelism", "1",
        "--rollback-monitor", f"{MONITOR}s", "--rollback-failure-action", "pause",
        "--health-cmd", q(health_command(settings)),
        "--health-interval", f"{HEALTH_INTERVAL}s",
        "--health-timeout", f"{max(1, int(hc.timeout))}s",
        "--health-retries", str(HEALTH_RETRIES),
        "--health-start-period", f"{HEALTH_START_PERIOD}s",
        "--stop-grace-period", f"{int(settings.deployment['stop_timeout'])}s",
        "--entrypoint", q("/bin/sh"),
    ]


def create_command(settings: Settings, image: str, version: str, secret: str,
                   command: list[str], order: str = "start-first") -> str:
    """`docker service create` of the app (detached: the caller waits for convergence)."""
    name = service_name(settings)
    publish = (f"mode=host,target={settings.app_port},published={settings.ports['proxy']},"
               "protocol=tcp")
    parts = ["docker", "service", "create", "--name", q(name),
             "--label", q(f"{LABEL}={name}"), "--label", q(f"com.togather.version={version}"),
             "--container-label", q(f"{LABEL}={name}"),
             "--publish", q(publish), "--secret", q(f"source={secret},target={SECRET_TARGET}"),
             *_common_flags(settings, order), q(image), "-c", q(WRAPPER), "sh",
             *[q(a) for a in command]]
    return " ".join(parts)


def update_command(settings: Settings, image: str, version: str, secret: str,
                   old_secrets: list[str], command: list[str],
                   order: str = "start-first") -> str:
    """`docker service update` to `image` (the same flags as create, so a changed setting
    takes effect with the new version)."""
    publish = (f"mode=host,target={settings.app_port},published={settings.ports['proxy']},"
               "protocol=tcp")
    parts = ["docker", "service", "update", "--image", q(image),
             "--label-add", q(f"com.togather.version={version}"),
             "--publish-rm", str(settings.app_port), "--publish-add", q(publish)]
    for old in old_secrets:
        if old != secret:
            parts += ["--secret-rm", q(old)]
    if secret not in old_secrets:
        parts += ["--secret-add", q(f"source={secret},target={SECRET_TARGET}")]
    args = ["-c", WRAPPER, "sh", *command]
    parts += [*_common_flags(settings, order), "--args", q(shlex.join(args)),
              q(service_name(settings))]
    return " ".join(parts)


def inspect_command(name: str) -> str:
    """The service and its tasks as JSON: line 1 the service (or `null`), line 2 the tasks."""
    n = q(name)
    return (f"docker service inspect --format '{{{{json .}}}}' {n} 2>/dev/null || echo null; "
            f"ids=$(docker service ps -q --no-trunc {n} 2>/dev/null); "
            f"if [ -n \"$ids\" ]; then docker inspect --type task --format '{{{{json .}}}}' $ids "
            "| tr '\\n' ',' | sed 's/^/[/; s/,$/]/'; echo; else echo '[]'; fi")


@dataclass
class Task:
    id: str
    node: str
    state: str
    desired: str
    image: str
    error: str
    message: str

    @property
    def running(self) -> bool:
        return self.state == "running" and self.desired == "running"


@dataclass
class ServiceView:
    """What the manager says about the service: None spec when it does not exist."""

    spec: dict[str, Any] | None
    update: dict[str, Any] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.spec is not None

    @property
    def image(self) -> str | None:
        if not self.spec:
            return None
        return self.spec["Spec"]["TaskTemplate"]["ContainerSpec"].get("Image")

    @property
    def secrets(self) -> list[str]:
        if not self.spec:
            return []
        return [s["SecretName"] for s in
                self.spec["Spec"]["TaskTemplate"]["ContainerSpec"].get("Secrets") or []]

    @property
    def desired_replicas(self) -> int:
        mode = (self.spec or {}).get("Spec", {}).get("Mode", {})
        return int(mode.get("Replicated", {}).get("Replicas", 0))

    def running_with(self, image: str) -> list[Task]:
        return [t for t in self.tasks if t.running and t.image == image]

    def last_error(self) -> str:
        failed = [t for t in self.tasks if t.error or t.state in ("failed", "rejected")]
        if not failed:
            return ""
        t = failed[0]
        return f"task {t.id[:12]} on node {t.node[:12]}: {t.error or t.message or t.state}"


def unplaceable(view: ServiceView) -> list[Task]:
    """Tasks the scheduler cannot place (`no suitable node`): under start-first with one
    task per node, what a node drained or down during the update leaves behind."""
    return [t for t in view.tasks if t.desired == "running" and t.state == "pending"
            and "no suitable node" in (t.error or t.message)]


def parse_view(stdout: str) -> ServiceView:
    lines = [line for line in stdout.splitlines() if line.strip()]
    spec = json.loads(lines[0]) if lines else None
    raw = json.loads(lines[1]) if len(lines) > 1 else []
    tasks = [Task(id=t.get("ID", ""), node=t.get("NodeID", ""),
                  state=t.get("Status", {}).get("State", ""),
                  desired=t.get("DesiredState", ""),
                  image=t.get("Spec", {}).get("ContainerSpec", {}).get("Image", ""),
                  error=t.get("Status", {}).get("Err", ""),
                  message=t.get("Status", {}).get("Message", ""))
             for t in raw]
    tasks.sort(key=lambda t: t.id)
    return ServiceView(spec, (spec or {}).get("UpdateStatus") or {}, tasks)


@dataclass(frozen=True)
class Progress:
    """One poll's verdict: done, failed (with the engine's reason), or still going."""

    done: bool = False
    failed: str | None = None
    detail: str = ""


def judge_progress(view: ServiceView, image: str, want: int, before: str | None) -> Progress:
    """Has the update (or the creation) to `image` converged? `before` is the
    UpdateStatus.StartedAt seen before this run's update: an older status is not ours."""
    status = view.update if view.update.get("StartedAt") != before else {}
    state = status.get("State", "")
    message = status.get("Message", "")
    running = len(view.running_with(image))
    detail = f"{running}/{want} tasks run the new image" + (f", update {state}" if state else "")
    if state in ("rollback_completed", "rollback_paused", "paused"):
        reason = message or state
        error = view.last_error()
        return Progress(failed=f"the swarm {state.replace('_', ' ')}: {reason}"
                        + (f" ({error})" if error else ""), detail=detail)
    if state in ("updating", "rollback_started"):
        # rollback_started: the engine is putting the old tasks back; wait for its verdict.
        return Progress(detail=detail)
    if view.image != image:
        return Progress(failed=f"the service runs {view.image}, not {image}: another "
                        "operation changed it", detail=detail)
    return Progress(done=running >= want, detail=detail)


# --- the engine's operations on the manager ----------------------------------------------------


class Engine:
    """The swarm operations of one run, on the primary host (a manager)."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.settings = session.settings
        self.name = service_name(self.settings)
        self.order = update_order(self.settings)
        self.node_lost = ""

    @property
    def manager(self) -> Host:
        return self.s.primary

    def view(self) -> ServiceView:
        out = self.manager.run(inspect_command(self.name), timeout=60,
                               what="reading the swarm service").stdout
        try:
            return parse_view(out)
        except (ValueError, KeyError, IndexError) as exc:
            raise SwarmError(f"unexpected answer from `docker service inspect` on "
                             f"{self.manager.name}: {type(exc).__name__}") from exc

    def check_node(self, host: Host) -> str:
        """The host's swarm node ID; the primary must be a manager, every host an active
        member of the same swarm."""
        out = self.s.host(host.name).run(
            "docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} "
            "{{.Swarm.NodeID}}'", timeout=60, what="reading the swarm state").stdout.split()
        state, control, node = (out + ["", "", ""])[:3]
        if state != "active":
            raise SwarmError(f"{host.name} is not part of a swarm (state {state or 'unknown'})",
                             hint="Join it to the swarm (docker swarm join) or remove it from "
                                  "the environment's hosts. Nothing was changed.")
        if host.name == self.settings.primary_host and control != "true":
            raise SwarmError(f"{host.name} (the first host) is not a swarm manager",
                             hint="The first host keeps the state and the lock and runs "
                                  "`docker service`: list a manager first. Nothing was "
                                  "changed.")
        return node

    def node_map(self) -> dict[str, str]:
        """node ID -> host name, for every host of the environment (a host that is no
        manager's known member is named by its error)."""
        outcomes = fleet.on_each(self.s.all_hosts, self.check_node,
                                 parallel=self.settings.deployment["parallel"], into={})
        fleet.raise_first_failure(outcomes)
        return {o.value: name for name, o in outcomes.items()}

    def ensure_secret(self) -> str:
        content = secret_content(self.settings)
        name = secret_name(self.settings, content)
        if self.manager.run(f"docker secret inspect {q(name)} >/dev/null 2>&1", timeout=60,
                            check=False).ok:
            return name
        result = self.manager.stream_into(
            f"docker secret create --label {q(f'{LABEL}={self.name}')} {q(name)} -",
            io.BytesIO(content), timeout=60)
        if not result.ok:
            raise SwarmError("docker secret create failed on " + self.manager.name + ": "
                             + cmd.bounded(cmd.tool_error(result.stdout, result.stderr,
                                                          result.exit_status), self.s.redact))
        return name

    def image_command(self, image: str) -> list[str]:
        """The image's entrypoint + cmd, read on the manager (which pulled it)."""
        out = self.manager.run(f"docker image inspect --format '{{{{json .Config}}}}' "
                               f"{q(image)}", timeout=60, what="reading the image").stdout
        command = command_of(json.loads(out or "{}") or {})
        if not command:
            raise SwarmError(f"{image} has neither ENTRYPOINT nor CMD: the service would "
                             "have nothing to run")
        return command

    def apply(self, image: str, version: str) -> tuple[ServiceView, str | None]:
        """Create or update the service to `image`; returns the view before and the
        UpdateStatus.StartedAt before (to tell this run's update from an older one)."""
        before = self.view()
        secret = self.ensure_secret()
        command = self.image_command(image)
        self.order = update_order(self.settings, self.available_nodes())
        if before.exists:
            line = update_command(self.settings, image, version, secret, before.secrets,
                                  command, self.order)
        else:
            line = create_command(self.settings, image, version, secret, command, self.order)
        with registry.docker_config(self.manager, self.settings,
                                    self.settings.remote_dir) as config:
            prefix = f"DOCKER_CONFIG={q(config)} " if config else ""
            auth = " --with-registry-auth" if config else ""
            verb = "update" if before.exists else "create"
            line = line.replace(f"docker service {verb}", f"{prefix}docker service {verb}{auth}",
                                1)
            result = self.manager.run(line, timeout=120, check=False)
        if not result.ok:
            raise SwarmError(f"docker service {verb} failed on {self.manager.name}: "
                             + cmd.bounded(cmd.tool_error(result.stdout, result.stderr,
                                                          result.exit_status), self.s.redact),
                             hint="Nothing was changed: the old version keeps serving.")
        return before, before.update.get("StartedAt")

    def available_nodes(self) -> int:
        """Nodes that can take a task now (Ready and Active)."""
        out = self.manager.run("docker node ls --format '{{.Status}}/{{.Availability}}'",
                               timeout=60, what="listing the swarm's nodes").stdout
        return sum(line.strip() == "Ready/Active" for line in out.splitlines())

    def go_stop_first(self, phase: str, console: Any) -> bool:
        """A node left during a start-first update or its rollback (drained or down): a task
        has no free node (one per node, host-mode port), and Swarm would wait for one for
        ever. Switch the running update or rollback to stop-first (the same image and spec,
        only the orders change): each remaining task is replaced in place while the others
        serve. True when switched; a no-op while every node is still there."""
        available = self.available_nodes()
        if available > replicas(self.settings):
            return False  # not a lack of nodes: leave it to the engine (and the deadline)
        result = self.manager.run(
            f"docker service update --detach --update-order stop-first "
            f"--rollback-order stop-first {q(self.name)}", timeout=120, check=False)
        if not result.ok:
            raise SwarmError(f"docker service update --update-order stop-first failed on "
                             f"{self.manager.name}: "
                             + cmd.bounded(cmd.tool_error(result.stdout, result.stderr,
                                                          result.exit_status), self.s.redact))
        self.order = f"{self.order}, then stop-first"
        self.node_lost = (f"only {available} of {len(self.settings.hosts)} nodes were Ready "
                          f"and Active during the {phase}, so it went on stop-first")
        console.note(f"swarm: only {available} of {len(self.settings.hosts)} nodes Ready and "
                     f"Active: no free node for a new task; the {phase} goes on stop-first on "
                     "the remaining nodes")
        return True

    def deadline_seconds(self) -> float:
        per_task = HEALTH_START_PERIOD + HEALTH_INTERVAL * (HEALTH_RETRIES + 2) + MONITOR \
            + UPDATE_DELAY + float(self.settings.health.deadline)
        return 60 + replicas(self.settings) * per_task * 2

    def wait(self, image: str, before: str | None, console: Any) -> ServiceView:
        """Until the service runs `image` on all its replicas (bounded). The engine's
        rollback, a pause, or the deadline -> HealthCheckError (exit 4) with its reason.
        A node lost mid-update (a task no node can take) switches the update, or the
        engine's rollback, to stop-first (go_stop_first), once each."""
        deadline = time.monotonic() + self.deadline_seconds()
        want = replicas(self.settings)
        last = ""
        next_node_check = 0.0
        switched: set[str] = set()
        engine_reason = ""
        while True:
            view = self.view()
            state = view.update.get("State", "") if view.update.get("StartedAt") != before \
                else ""
            if state == "rollback_started":
                engine_reason = view.update.get("Message", "") or engine_reason
            if self.node_lost and view.image != image and state not in (
                    "updating", "rollback_started"):
                # Our switch to stop-first came during (or before) the engine's rollback: the
                # service is back on the old spec. Done when every replica runs it.
                if len(view.running_with(view.image or "")) >= want:
                    raise HealthCheckError(
                        "the swarm rolled the update back"
                        + (f" ({engine_reason})" if engine_reason else "")
                        + f"; {self.node_lost}",
                        hint="The old version keeps serving on the remaining nodes. Deploy "
                             "again when you are ready: with a node missing, the update is "
                             "stop-first from the start.")
                progress = Progress(detail="the old version converging after the rollback")
            else:
                progress = judge_progress(view, image, want, before)
                if progress.failed and self.node_lost:
                    progress = replace(progress, failed=f"{progress.failed}; {self.node_lost}")
            if progress.detail != last:
                console.debug(f"swarm: {progress.detail}")
                last = progress.detail
            if progress.failed:
                raise HealthCheckError(progress.failed, hint="The engine rolled back: the old "
                                       "version keeps serving." if "rollback" in progress.failed
                                       else None)
            if progress.done:
                return view
            phase = {"updating": "update", "rollback_started": "rollback"}.get(state)
            if (phase and phase not in switched and unplaceable(view)
                    and time.monotonic() >= next_node_check):
                next_node_check = time.monotonic() + NODE_CHECK_SECONDS
                if self.go_stop_first(phase, console):
                    switched.add(phase)
            if time.monotonic() > deadline:
                error = view.last_error()
                raise HealthCheckError(
                    f"the swarm did not converge within {self.deadline_seconds():.0f} s "
                    f"({progress.detail})" + (f"; {error}" if error else "")
                    + (f"; {self.node_lost}" if self.node_lost else ""),
                    hint=f"See `docker service ps {self.name}` on {self.manager.name}.")
            time.sleep(POLL_SECONDS)

    def verify(self, view: ServiceView, image: str, version: str,
               nodes: dict[str, str]) -> list[str]:
        """Every running task's node answers healthy with `version` on the published port,
        then the public URL does, a few times (the load balancer spreads them)."""
        lines = []
        for task in view.running_with(image):
            host_name = nodes.get(task.node)
            if host_name is None:
                raise HealthCheckError(f"a task runs on node {task.node[:12]}, which is none of "
                                       "the environment's hosts")
            verdict = slots.check_health(self.settings, self.s.host(host_name),
                                         self.settings.ports["proxy"], expected_version=version,
                                         timeout=float(self.settings.health.timeout))
            if verdict.status not in ("healthy", "degraded"):
                raise HealthCheckError(f"{host_name}: {verdict.summary()}")
            lines.append(f"{host_name} {verdict.status}")
        public = check_public(self.settings, version)
        lines.append(f"{self.settings.public_url} {public}")
        return lines

    def remove(self) -> None:
        self.manager.run(f"docker service rm {q(self.name)}", timeout=60, check=False)

    def prune_secrets(self, keep: list[str]) -> None:
        """This service's secrets other than `keep` (one still in use is refused: kept)."""
        out = self.manager.run(f"docker secret ls --filter {q(f'label={LABEL}={self.name}')} "
                               "--format '{{.Name}}'", timeout=60, check=False).stdout.split()
        for name in out:
            if name not in keep:
                self.manager.run(f"docker secret rm {q(name)} >/dev/null 2>&1", timeout=60,
                                 check=False)


def check_public(settings: Settings, version: str) -> str:
    """PUBLIC_CHECKS answers through the public URL, every one the new version (bounded)."""
    url = settings.public_url.rstrip("/") + (settings.version_endpoint or
                                             settings.health_endpoint)
    deadline = time.monotonic() + PUBLIC_DEADLINE
    good = 0
    last = "no answer"
    while good < PUBLIC_CHECKS:
        if time.monotonic() > deadline:
            raise HealthCheckError(f"{url} did not answer with {version} {PUBLIC_CHECKS} times "
                                   f"within {PUBLIC_DEADLINE:.0f} s (last: {last})")
        try:
            resp = requests.get(url, timeout=float(settings.health.timeout))
            body = resp.text
            ok = resp.status_code == 200 and (settings.version_endpoint is None
                                              or version in body)
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            ok, last = False, type(exc).__name__
        if ok:
            good += 1
        else:
            time.sleep(0.5)
    return f"{good}/{PUBLIC_CHECKS} answers with {version}"


# --- deploy and rollback ---------------------------------------------------------------------


class SwarmSteps:
    """What SwarmDeploy and SwarmRollback share: the update step, its undo, the verification
    and the secrets' cleanup."""

    s: Session
    settings: Settings
    progress: Any
    release: Release | None
    lease: Any

    def engine_setup(self) -> None:
        self.engine = Engine(self.s)
        self.nodes: dict[str, str] = {}
        self.service_image: str | None = None
        self.applied: ServiceView | None = None
        self.created = False
        self.rolled_back_by_engine = False
        self.converged: ServiceView | None = None

    def settle_slots(self, state: Any) -> None:
        """A swarm has no slots and no proxies: nothing to settle under the lock (the lock
        steps of Deploy and Rollback call this)."""

    @property
    def switched(self) -> bool:
        return "update" in self.progress.completed

    @property
    def gate_failed(self) -> bool:
        return self.rolled_back_by_engine

    def update(self, note: StepNote) -> None:
        """Step: the service to the new image; wait until the swarm converges."""
        assert self.service_image is not None and self.release is not None
        before, started = self.engine.apply(self.service_image, self.release.sha7)
        self.applied = before
        self.created = not before.exists
        try:
            view = self.engine.wait(self.service_image, started, self.s.console)
        except HealthCheckError as exc:
            self.rolled_back_by_engine = True
            if self.created:
                # Nothing served before: a service that never became healthy goes away.
                self.engine.remove()
                exc.message += "; the new service was removed"
            raise
        self.converged = view
        running = view.running_with(self.service_image)
        where = ", ".join(sorted(self.nodes.get(t.node, t.node[:12]) for t in running))
        note(f"{self.engine.name} {'created' if self.created else 'updated'}: "
             f"{len(running)}/{replicas(self.settings)} tasks of {self.release.sha7} on {where} "
             f"({self.engine.order})")

    def undo_update(self) -> None:
        """Interrupted before convergence: an update still running is rolled back by the
        engine, a service this run created is removed."""
        if self.applied is None or self.switched or self.rolled_back_by_engine:
            return
        if self.created:
            self.engine.remove()
            self.s.console.note(f"removed the new service {self.engine.name}")
            return
        view = self.engine.view()
        if view.update.get("State") == "updating":
            self.engine.manager.run(f"docker service update --detach --rollback "
                                    f"{q(self.engine.name)}", timeout=60, check=False)
            self.s.console.note(f"asked the swarm to roll {self.engine.name} back")

    def verify(self, note: StepNote) -> None:
        """Step: the version on every task's node and through the public URL."""
        assert self.converged is not None and self.service_image and self.release
        lines = self.engine.verify(self.converged, self.service_image, self.release.sha7,
                                   self.nodes)
        note("; ".join(lines))

    def cleanup(self, note: StepNote) -> None:
        view = self.engine.view()
        self.engine.prune_secrets(view.secrets)
        note(f"secrets other than {', '.join(view.secrets) or 'none'} removed")


class SwarmDeploy(SwarmSteps, Deploy):
    """`inv deploy` on an environment with `engine: swarm`."""

    def __init__(self, session: Session, options: Any) -> None:
        super().__init__(session, options)
        self.engine_setup()

    def check_host(self, host: Host, *, primary: bool) -> None:
        super().check_host(host, primary=primary)
        node = self.engine.check_node(host)
        with self._nodes_lock:
            self.nodes[node] = host.name

    _nodes_lock = threading.Lock()

    def validate(self, note: StepNote) -> None:
        if self.settings.database["migration_tool"] == "command" and self.migrations_enabled:
            raise ConfigError(f"{self.settings.env}: migration_tool `command` (in the image, "
                              "through Compose) is not supported with engine swarm yet; use "
                              "dbmate, golang-migrate or custom")
        super().validate(note)

    def target_label(self) -> str:
        """A swarm has no slots: the service is updated in place, task by task."""
        return f"service {self.engine.name}"

    def acquire_lock(self, note: StepNote) -> None:
        """Step: the lock, then the state re-read under it (no proxies to settle)."""
        self.take_lock(self.deployment_id, force=self.options.force,
                       lock_wait=self.options.lock_wait)
        self.state = self.s.store.read().state
        self.slots = Slots(self.state.next_slot(), self.state.active_slot)
        note(f"{self.lock['lock_id']} held by {self.lock['locked_by']}")
        self.notify("started")

    def build(self, note: StepNote) -> None:
        """Step: published once to the registry (built and pushed, or reused), pulled on the
        manager (its entrypoint is read there) with the release the migrations run from."""
        build = images.Build(self.settings, self.release.commit, self.started_at)
        published = images.publish(build, self.s)
        assert published.digest is not None  # config: swarm needs the registry strategy
        self.image_digest = published.digest
        self.service_image = published.digest
        primary = self.s.primary
        if self.settings.has_database:
            slots.write_pgpass(self.settings, primary)
        primary.run(cmd.host_directories(cmd.Layout(self.settings.remote_dir)), timeout=30,
                    what="creating the remote directories")
        images.ensure_on_host(build, primary, published)
        note(f"{published.label} (nodes pull it by digest)")

    def plan(self) -> list[str]:
        st = self.settings
        build = images.Build(st, self.release.commit, self.started_at)
        lines = [f"[{st.primary_host}] lock {st.state_path} (compare-and-swap under flock)",
                 *images.publish_plan(build),
                 f"[{st.primary_host}] " + images.host_plan(build)]
        if self.migrations_enabled:
            lines += self.migration_plan(st.primary_host, cmd.Layout(st.remote_dir))
        lines += [
            f"[{st.primary_host}] docker secret create {service_name(st)}-env-<hash> - "
            "(the app's environment, through stdin) unless it exists",
            f"[{st.primary_host}] docker service create/update {service_name(st)} to the "
            f"pushed digest: {replicas(st)} replicas, at most 1 per node, {update_order(st)}, "
            f"parallelism 1, failure action rollback, healthcheck "
            f"{st.health_endpoint} on port {st.app_port}, published in host mode on "
            f"{st.ports['proxy']}",
            f"[{st.primary_host}] wait until every task runs the new image (<= "
            f"{Engine(self.s).deadline_seconds():.0f} s); verify each task's node and "
            f"{st.public_url}",
            f"[{st.primary_host}] record {self.deployment_id} in {st.state_path}; release the "
            "lock",
        ]
        return lines

    def finish(self, note: StepNote) -> None:
        self.cleanup(note)


SwarmDeploy.steps = (
    Step("validate", "configuration, git ref, hosts and swarm", SwarmDeploy.validate),
    Step("lock", "taking the environment lock", SwarmDeploy.acquire_lock),
    Step("build", "image in the registry", SwarmDeploy.build),
    Step("snapshot", "database snapshot", SwarmDeploy.snapshot),
    Step("migrate", "database migrations", SwarmDeploy.migrate, destructive=True),
    Step("update", "swarm rolling update", SwarmDeploy.update, undo=SwarmDeploy.undo_update,
         destructive=True, commit=True),
    Step("verify", "the version on every node and the public URL", SwarmDeploy.verify),
    Step("record", "deployment state", SwarmDeploy.record, destructive=True),
    Step("finish", "old secrets", SwarmDeploy.finish),
)


class SwarmRollback(SwarmSteps, Rollback):
    """`inv rollback` on an environment with `engine: swarm`: the target deployment's image
    by digest, with the same rolling update as a deploy."""

    def __init__(self, session: Session, options: Any) -> None:
        super().__init__(session, options)
        self.engine_setup()

    def validate(self, note: StepNote) -> None:
        super().validate(note)
        self.nodes = self.engine.node_map()

    def image(self, note: StepNote) -> None:
        """Step: the target's digest (recorded, else the registry's for its tag), pulled on
        the manager; rebuilt and pushed from its commit if the registry lost it."""
        build = images.Build(self.settings, self.chosen["git_commit"], utc_now())
        digest = self.chosen.get("image_digest")
        if not digest:
            remote = cmd.registry_ref(self.settings, self.chosen["version"])
            found = registry.remote_digest(self.settings, remote)
            digest = cmd.digest_ref(remote, found) if found else None
        if digest is None:
            digest = self.published(build).digest
        if digest is None:
            raise RollbackError(f"no image of {self.chosen['version']} in the registry and it "
                                "could not be rebuilt")
        self.service_image = digest
        images.pull_by_digest(build, self.s.primary, digest)
        note(f"{digest.split('@')[1][:19]} of {self.chosen['version']}")

    def plan(self) -> list[str]:
        st = self.settings
        return [f"[{st.primary_host}] docker service update {service_name(st)} to the image "
                f"of {self.chosen['version']} ({self.chosen.get('image_digest') or 'by tag'}), "
                f"{update_order(st)}, failure action rollback; wait, verify, record"]

    def finish(self, note: StepNote) -> None:
        self.cleanup(note)


SwarmRollback.steps = (
    Step("validate", "state, target and swarm", SwarmRollback.validate),
    Step("lock", "taking the environment lock", SwarmRollback.acquire_lock),
    Step("restore_database", "database from the snapshot", SwarmRollback.restore_database,
         destructive=True, when=lambda rollback: rollback.options.restore_db, label="restore"),
    Step("image", "the target's image", SwarmRollback.image),
    Step("update", "swarm rolling update", SwarmRollback.update,
         undo=SwarmRollback.undo_update, destructive=True, commit=True),
    Step("verify", "the version on every node and the public URL", SwarmRollback.verify),
    Step("record", "deployment state", SwarmRollback.record, destructive=True),
    Step("finish", "old secrets", SwarmRollback.finish),
)


# --- status, health, logs ---------------------------------------------------------------------


def describe_deployment(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['version']} ({d['id']}, {d.get('status', '?')}, {d.get('deployed_at', '?')})"


def status_doc(session: Session, state: State) -> dict[str, Any]:
    engine = Engine(session)
    nodes = engine.node_map()
    view = engine.view()
    per_node: dict[str, dict[str, Any]] = {name: {"running": 0, "tasks": []}
                                           for name in session.settings.hosts}
    for task in view.tasks:
        if task.desired != "running" and task.state != "running":
            continue
        name = nodes.get(task.node, task.node[:12])
        entry = per_node.setdefault(name, {"running": 0, "tasks": []})
        entry["running"] += int(task.running)
        entry["tasks"].append({"id": task.id[:12], "state": task.state,
                               "image": task.image, "error": task.error or None})
    running = sum(n["running"] for n in per_node.values())
    return {"environment": session.settings.env, "engine": "swarm",
            "service": engine.name if view.exists else None,
            "image": view.image, "replicas": {"running": running,
                                              "desired": view.desired_replicas},
            "update": {"state": view.update.get("State"),
                       "message": view.update.get("Message")} if view.update else None,
            "nodes": per_node, "current_deployment": state.current,
            "previous_deployment": state.previous, "lock": state.lock}


def print_status(session: Session, doc: dict[str, Any], describe_lock: Any) -> None:
    p = session.console.print
    p(f"environment: {doc['environment']} (swarm: {', '.join(session.settings.hosts)})")
    p(f"current:     {describe_deployment(doc['current_deployment'])}")
    p(f"previous:    {describe_deployment(doc['previous_deployment'])}")
    if doc["service"] is None:
        p(f"service:     {service_name(session.settings)} does not exist (not deployed yet)")
    else:
        update = doc["update"] or {}
        p(f"service:     {doc['service']} {doc['replicas']['running']}/"
          f"{doc['replicas']['desired']} running, image {doc['image']}")
        p(f"update:      {update.get('state') or 'none'}"
          + (f" ({update['message']})" if update.get("message") else ""))
        for name, info in doc["nodes"].items():
            states = ", ".join(t["state"] for t in info["tasks"]) or "no task"
            p(f"node {name}: {info['running']} running ({states})")
    p(f"lock:        {describe_lock(doc['lock'])}")


@dataclass(frozen=True)
class TaskHealth:
    host: str
    task: str
    verdict: Any
    latency_ms: int


def task_health(session: Session, expected_version: str | None) -> list[TaskHealth]:
    """Every running task's health on its node's published port."""
    engine = Engine(session)
    nodes = engine.node_map()
    view = engine.view()
    if not view.exists:
        raise HealthCheckError(f"the service {engine.name} does not exist (not deployed yet)")
    out = []
    for task in [t for t in view.tasks if t.running]:
        name = nodes.get(task.node)
        if name is None:
            continue
        start = time.monotonic()
        verdict = slots.check_health(session.settings, session.host(name),
                                     session.settings.ports["proxy"],
                                     expected_version=expected_version,
                                     timeout=float(session.settings.health.timeout))
        out.append(TaskHealth(name, task.id[:12], verdict,
                              int((time.monotonic() - start) * 1000)))
    if len(out) < view.desired_replicas:
        out.append(TaskHealth("-", "-", _missing(len(out), view.desired_replicas), 0))
    return out


def _missing(running: int, desired: int) -> Any:
    from .health import unreachable
    return unreachable(f"only {running} of {desired} tasks are running")


def show_logs(session: Session, request: LogRequest) -> None:
    """`docker service logs` on the manager (every task's lines, prefixed by the engine with
    the task and node), secrets masked, --grep applied here."""
    name = service_name(session.settings)
    parts = ["docker", "service", "logs", "--no-trunc", "--timestamps",
             "--tail", str(request.lines)]
    if request.since is not None:
        parts += ["--since", f"{parse_duration(request.since)}s"]
    if request.follow:
        parts.append("--follow")
    command = " ".join([*parts, q(name)])
    if request.follow:
        command = cmd.until_input_closes(command)
    read_logs(session, [session.primary], command, request)

