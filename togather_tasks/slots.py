"""Blue-green slot operations shared by deploy and rollback: write the host files, start a slot,
gate it on its health, switch nginx to it (with verification and automatic restore), stop a
slot. Each function is one runbook step on one host."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import time
from dataclasses import dataclass

from . import commands as cmd
from .config import Settings, app_environment
from .errors import CommandError, HealthCheckError, HostError, TogatherError
from .health import Verdict, judge, running_version, unreachable
from .hosts import Host
from .output import Console
from .signals import shielded

q = shlex.quote
PORT_BUSY_MARKERS = ("port is already allocated", "address already in use")
_UPSTREAM_SLOT = re.compile(r"\$togather_slot \{\s*default (blue|green);")


@dataclass
class SlotTarget:
    slot: str
    image: str
    sha7: str


def prepare_host(settings: Settings, host: Host, *, primary: bool) -> None:
    """Directories, compose.yml, app.env (mode 600) and, on the primary, the PGPASSFILE.
    Idempotent: every deploy rewrites them, so a changed secret takes effect."""
    layout = cmd.Layout(settings.remote_dir)
    host.run(cmd.host_directories(layout), timeout=30, what="creating the remote directories")
    host.write_file(layout.compose_file, (cmd.DOCKER_DIR / "compose.yml").read_bytes(),
                    mode=0o644)
    host.write_file(layout.app_env, cmd.app_env_file(app_environment(settings.secrets))
                    .encode(), mode=0o600)
    if primary and settings.has_database:
        write_pgpass(settings, host)
    for name in ("Dockerfile", "nginx.conf"):
        host.write_file(f"{layout.proxy_dir}/{name}",
                        (cmd.DOCKER_DIR / "nginx" / name).read_bytes(), mode=0o644)


def write_pgpass(settings: Settings, host: Host) -> None:
    """The database password for pg_dump, psql and the migration tools, mode 600."""
    layout = cmd.Layout(settings.remote_dir)
    host.run(cmd.private_directories(layout.root), timeout=30,
             what="creating the remote directory")
    host.write_file(layout.pgpass, cmd.pgpass_line(settings.migrate_database_url).encode(),
                    mode=0o600)


def ensure_proxy_image(settings: Settings, host: Host, timeout: float) -> bool:
    """Build the proxy image on the host if it is not there yet. True when it was built."""
    image = cmd.proxy_image_ref()
    if host.run(f"docker image inspect {q(image)} > /dev/null 2>&1", check=False).ok:
        return False
    host.run(f"docker build --quiet -t {q(image)} {q(cmd.Layout(settings.remote_dir).proxy_dir)}",
             timeout=timeout, what="building the nginx proxy image")
    return True


def read_slot_images(settings: Settings, host: Host) -> dict[str, str]:
    layout = cmd.Layout(settings.remote_dir)
    out = host.run(f"cat {q(layout.slots_env)} 2>/dev/null || true", timeout=30).stdout
    values = cmd.parse_env_lines(out)
    images = {}
    for slot in ("blue", "green"):
        image = values.get(f"{slot.upper()}_IMAGE", "")
        if image and not image.endswith(":none"):
            images[slot] = image
    return images


def start_slot(settings: Settings, host: Host, target: SlotTarget) -> None:
    """Point the slot at its image in slots.env and (re)create it with Compose."""
    layout = cmd.Layout(settings.remote_dir)
    images = read_slot_images(settings, host)
    images[target.slot] = target.image
    host.write_file(layout.slots_env, cmd.slots_env(settings, images).encode(), mode=0o644)
    # Never pull: every strategy has put the image on the host under this local name (the
    # registry one pulls by digest first); a pull here would fetch whatever a public registry
    # holds under that name.
    result = host.run(cmd.compose(settings, "up", "--detach", "--no-deps", "--pull",
                                  "never", cmd.service(target.slot)),
                      timeout=300, check=False)
    if not result.ok:
        text = (result.stderr + result.stdout).lower()
        port = settings.ports[target.slot]
        if "no such image" in text:
            raise CommandError(
                f"the image {target.image} is not on {host.name}, so the {target.slot} slot "
                "cannot start", hint="It was there when this run built or loaded it: was it "
                                     "removed meanwhile (docker image prune, another cleanup)? "
                                     "Nothing was switched; run the command again.",
                exit_status=result.exit_status)
        if any(marker in text for marker in PORT_BUSY_MARKERS):
            raise CommandError(
                f"port {port} on {host.name} is already in use by something else, so the "
                f"{target.slot} slot cannot start",
                hint=f"Nothing was stopped. Free port {port} or choose another one in "
                     f"config/deployment.yml (environments.{settings.env}.ports."
                     f"{target.slot}).", exit_status=result.exit_status)
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CommandError(f"docker compose could not start the {target.slot} slot on "
                           f"{host.name}: {detail}", exit_status=result.exit_status)


def slot_container_state(settings: Settings, host: Host, slot: str) -> str:
    """`running 0 0` / `exited 1 3` / `restarting 1 5` (status, exit code, restarts)."""
    ids = host.run(cmd.compose(settings, "ps", "--all", "--quiet", cmd.service(slot)),
                   timeout=60, check=False).stdout.split()
    if not ids:
        return "missing"
    out = host.run("docker inspect --format '{{.State.Status}} {{.State.ExitCode}} "
                   "{{.RestartCount}}' " + q(ids[0]), timeout=60, check=False)
    return out.stdout.strip() or "missing"


def check_health(settings: Settings, host: Host, port: int, *, expected_version: str | None,
                 timeout: float, address: str = "127.0.0.1") -> Verdict:
    def fetch(path: str) -> tuple[int, bytes]:
        resp = host.http_get(address, port, path, timeout=timeout)
        return resp.status, resp.body

    try:
        return judge(fetch, mode=settings.health_mode, health_endpoint=settings.health_endpoint,
                     version_endpoint=settings.version_endpoint,
                     expected_version=expected_version)
    except (OSError, ConnectionError, HostError) as exc:
        return unreachable(f"no answer from {address}:{port}: {exc}")
    except Exception as exc:  # noqa: BLE001 - malformed HTTP (http.client errors) and friends
        return unreachable(f"malformed HTTP answer from {address}:{port}: "
                           f"{type(exc).__name__}")


def health_gate(settings: Settings, host: Host, target: SlotTarget, console: Console) -> Verdict:
    """Poll the new slot until it is healthy and runs the expected version, within the
    configured grace, interval, timeout and retries, and the overall deadline whatever the
    retries (an endpoint that never answers must not hold the deploy for retries x timeout);
    fail fast when its container dies."""
    hc = settings.health
    deadline = time.monotonic() + hc.deadline
    time.sleep(min(hc.startup_grace, hc.deadline))
    port = settings.ports[target.slot]
    verdict = unreachable("not checked")
    attempt = 0
    while attempt < hc.retries and (remaining := deadline - time.monotonic()) > 0:
        attempt += 1
        verdict = check_health(settings, host, port, expected_version=target.sha7,
                               timeout=min(hc.timeout, remaining))
        if verdict.status == "healthy":
            return verdict
        if verdict.status == "unreachable" or attempt % 5 == 0:
            _require_running(settings, host, target.slot)
        console.debug(f"health attempt {attempt}/{hc.retries}: {verdict.summary()}")
        if attempt < hc.retries:
            time.sleep(max(0.0, min(hc.interval, deadline - time.monotonic())))
    raise HealthCheckError(
        f"the {target.slot} slot did not become healthy after {attempt} checks in "
        f"{hc.deadline:g} s at most: {verdict.summary()}",
        hint=_logs_hint(settings, host, target.slot))


def _require_running(settings: Settings, host: Host, slot: str) -> None:
    state = slot_container_state(settings, host, slot)
    status, _, rest = state.partition(" ")
    restarts = rest.split()[-1] if rest.split() else "0"
    if status in ("exited", "dead", "missing") or (restarts.isdigit() and int(restarts) > 0):
        raise HealthCheckError(
            f"the {slot} slot's container is not running ({state}): the app crashed at start",
            hint=_logs_hint(settings, host, slot))


def _logs_hint(settings: Settings, host: Host, slot: str) -> str:
    out = host.run(cmd.compose(settings, "logs", "--no-color", "--tail", "15",
                               cmd.service(slot)), timeout=60, check=False)
    lines = (out.stdout + out.stderr).strip().splitlines()[-15:]
    return "Last lines of the app's log:\n" + "\n".join("  " + line for line in lines) \
        if lines else "The app wrote no log lines."


def read_upstream(settings: Settings, host: Host) -> str:
    layout = cmd.Layout(settings.remote_dir)
    return host.run(f"cat {q(layout.upstream_file)} 2>/dev/null || true", timeout=30).stdout


def apply_proxy_config(settings: Settings, host: Host) -> str:
    """Make the running proxy serve the upstream file with the configured settings: start it
    when it is not running (first deploy, host rebooted), recreate it when its image, port or
    bind address differ from the configuration (package upgrade, deployment.yml edited: a
    reload cannot move a published port), else `nginx -t` and a graceful reload. Returns what
    happened: `reloaded`, `started` or `recreated (what changed)`."""
    inspected = host.run(running_proxy_command(settings), timeout=60, check=False).stdout
    if not inspected.strip():
        host.run(cmd.compose(settings, "up", "--detach", "--no-deps", "proxy"), timeout=300,
                 what="starting the nginx proxy")
        return "started"
    changes = proxy_changes(settings, inspected)
    if changes:
        host.run(cmd.compose(settings, "up", "--detach", "--no-deps", "--force-recreate",
                             "proxy"), timeout=300, what="recreating the nginx proxy")
        return f"recreated ({', '.join(changes)})"
    result = host.run(cmd.compose(settings, "exec", "-T", "proxy", "sh", "-c",
                                  q("nginx -t -q && nginx -s reload")), timeout=60, check=False)
    if not result.ok:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommandError(f"nginx -t (configuration test) or reload failed on {host.name}: "
                           f"{detail}", exit_status=result.exit_status)
    return "reloaded"


def running_proxy_command(settings: Settings) -> str:
    """The running proxy's image and published port (`IMAGE {json}`), empty when none runs:
    one round trip."""
    return (f"id=$({cmd.compose(settings, 'ps', '--quiet', '--status', 'running', 'proxy')}"
            ' | head -n 1); [ -z "$id" ] || docker inspect --format '
            + q("{{.Config.Image}} {{json .HostConfig.PortBindings}}") + ' "$id"')


def proxy_changes(settings: Settings, inspected: str) -> list[str]:
    """How the running proxy (running_proxy_command's output) differs from the
    configuration, one phrase per difference; empty when it matches."""
    image, _, bindings = inspected.strip().partition(" ")
    try:
        published = (json.loads(bindings or "null") or {}).get("80/tcp") or [{}]
    except (ValueError, AttributeError):
        published = [{}]
    port, bind = published[0].get("HostPort"), published[0].get("HostIp") or "0.0.0.0"  # noqa: S104
    wanted = {"image": cmd.proxy_image_ref(), "port": str(settings.ports["proxy"]),
              "bind address": settings.proxy["bind"]}
    running = {"image": image, "port": port, "bind address": bind}
    return [f"{what} {running[what]} -> {value}" for what, value in wanted.items()
            if running[what] != value]


def proxy_address(settings: Settings) -> str:
    bind = settings.proxy["bind"]
    return "127.0.0.1" if bind == "0.0.0.0" else bind  # noqa: S104 - comparing, not binding


def serving_slot(settings: Settings, host: Host) -> str | None:
    """The slot nginx really routes to right now (its X-Togather-Slot header), or None when
    no proxy answers (first deploy). The state file can lag behind after a crash between the
    switch and the record step; building into the slot that is serving would be an outage."""
    try:
        resp = host.http_get(proxy_address(settings), settings.ports["proxy"],
                             settings.version_endpoint or settings.health_endpoint, timeout=5)
    except (OSError, ConnectionError, HostError):
        return None
    except Exception:  # noqa: BLE001 - a proxy answering garbage tells us nothing
        return None
    slot = resp.headers.get("x-togather-slot")
    return slot if slot in ("blue", "green") else None


def verify_proxy(settings: Settings, host: Host, target: SlotTarget) -> str | None:
    """Ask the proxy until a fresh connection lands on the new slot with the new version.
    Returns None on success, else what was seen last."""
    last = "no answer"
    for _ in range(settings.proxy["verify_attempts"]):
        try:
            resp = host.http_get(proxy_address(settings), settings.ports["proxy"],
                                 settings.version_endpoint or settings.health_endpoint,
                                 timeout=5)
            slot = resp.headers.get("x-togather-slot")
            # Without a version endpoint (an http-mode app) the slot header alone tells.
            version = running_version(resp.body) if settings.version_endpoint else target.sha7
            if resp.status == 200 and slot == target.slot and version == target.sha7:
                return None
            last = f"HTTP {resp.status}, slot {slot}, version {version}"
        except (OSError, ConnectionError, HostError) as exc:
            last = str(exc)
        time.sleep(0.25)
    return last


def upstream_slot(upstream: str) -> str | None:
    """The slot an upstream file (see commands.upstream_conf) routes to, if any."""
    match = _UPSTREAM_SLOT.search(upstream)
    return match.group(1) if match else None


def routed_slot(settings: Settings, host: Host) -> str | None:
    """The slot this host's proxy routes to: what it answers, else (proxy down) what its
    upstream file says and it will load when it comes back. None: no slot (first deploy)."""
    return serving_slot(settings, host) or upstream_slot(read_upstream(settings, host))


def switch_traffic(settings: Settings, host: Host, target: SlotTarget) -> str:
    """Write the upstream for the new slot, test, reload, verify; on any failure, Ctrl-C and
    SIGTERM included, put the old upstream back so traffic stays on (or returns to) the old
    slot. Returns how the proxy took the change (see apply_proxy_config)."""
    layout = cmd.Layout(settings.remote_dir)
    previous = read_upstream(settings, host)
    host.write_file(layout.upstream_file, cmd.upstream_conf(settings, target.slot).encode(),
                    mode=0o644)
    try:
        how = apply_proxy_config(settings, host)
        seen = verify_proxy(settings, host, target)
        if seen is not None:
            raise HealthCheckError(
                f"after the switch the proxy does not serve {target.slot}/{target.sha7} "
                f"(last answer: {seen})")
    except BaseException as exc:
        with shielded():
            restore_upstream(settings, host, previous)
        if isinstance(exc, TogatherError) and not isinstance(exc, HealthCheckError):
            raise HealthCheckError(f"switching traffic to {target.slot} failed: {exc.message}",
                                   hint="The previous nginx upstream was restored; traffic "
                                        "stays on the old slot.") from None
        raise
    return how


def restore_upstream(settings: Settings, host: Host, previous: str) -> None:
    layout = cmd.Layout(settings.remote_dir)
    if previous:
        host.write_file(layout.upstream_file, previous.encode(), mode=0o644)
        # If this fails, the running nginx never loaded the bad config: it still serves the
        # old slot.
        with contextlib.suppress(TogatherError):
            apply_proxy_config(settings, host)
    else:
        host.run(f"rm -f {q(layout.upstream_file)}", timeout=30, check=False)


def stop_slot(settings: Settings, host: Host, slot: str) -> None:
    host.run(cmd.compose(settings, "stop", "--timeout", str(settings.deployment["stop_timeout"]),
                         cmd.service(slot)), timeout=settings.deployment["stop_timeout"] + 60,
             what=f"stopping the {slot} slot")
