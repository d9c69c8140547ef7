"""Blue-green slots on one host, shared by deploy and rollback: write the host files, start a
slot, gate it on its health, stop it. Each function is one runbook step on one host; moving
traffic between slots is the proxy's (proxy.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from . import commands as cmd
from . import edge
from .config import Settings, app_environment
from .errors import CommandError, HealthCheckError, HostError
from .health import Verdict, judge, unreachable
from .hosts import Host
from .output import Console
from .state import other_slot

PORT_BUSY_MARKERS = ("port is already allocated", "address already in use")


@dataclass(frozen=True)
class SlotTarget:
    """What one slot is to run: the image of a version."""

    slot: str
    image: str
    sha7: str


@dataclass(frozen=True)
class Slots:
    """The slot an operation starts (`new`) and the one traffic leaves (`old`, None on the
    first deploy)."""

    new: str
    old: str | None


@dataclass(frozen=True)
class SlotChoice:
    slots: Slots
    repair: tuple[str, ...] = ()
    warning: str | None = None


def choose_slots(active_in_state: str | None, routes: dict[str, str | None]) -> SlotChoice:
    """The new slot is the idle one, judged by what every host's proxy routes to (`routes`,
    host -> slot, in the environment's order), since the state file lags behind after a crash
    between the switch and the record step, and starting a slot that serves is an outage.
    Hosts that disagree (a run killed between two hosts' switches) are repaired towards one
    slot: the state file's when a host still routes to it, else the first host's; the hosts
    in `repair` must be switched to it before anything starts, so that no host routes to the
    slot about to be recreated."""
    routed = [slot for slot in routes.values() if slot]
    if len(set(routed)) > 1:
        old = active_in_state if active_in_state in routed else routed[0]
        repair = tuple(host for host, slot in routes.items() if slot and slot != old)
        described = ", ".join(f"{host} -> {slot}" for host, slot in routes.items() if slot)
        return SlotChoice(Slots(other_slot(old), old), repair,
                          f"the hosts' proxies disagree ({described}): an earlier run was "
                          f"interrupted between two hosts' switches; switching "
                          f"{', '.join(repair)} back to {old} first")
    serving = routed[0] if routed else None
    if serving and serving != active_in_state:
        return SlotChoice(Slots(other_slot(serving), serving), (),
                          f"the proxy serves the {serving} slot but the state file says "
                          f"{active_in_state or 'none'} (an earlier run was interrupted); "
                          f"using the other slot")
    old = active_in_state
    return SlotChoice(Slots(other_slot(old) if old else "blue", old))


def prepare_host(settings: Settings, host: Host, *, primary: bool) -> None:
    """Directories, compose.yml, app.env (mode 600) and, on the primary, the PGPASSFILE.
    Idempotent: every deploy rewrites them, so a changed secret takes effect."""
    layout = cmd.Layout(settings.remote_dir)
    host.run(cmd.host_directories(layout), timeout=30, what="creating the remote directories")
    write_compose_files(host, layout)
    host.write_file(layout.app_env, cmd.app_env_file(app_environment(settings.secrets))
                    .encode(), mode=0o600)
    if primary and settings.has_database:
        write_pgpass(settings, host)
    engine = cmd.proxy_engine(settings)
    for name in cmd.PROXY_IMAGE_FILES[engine]:
        source = cmd.DOCKER_DIR / engine / name
        host.write_file(f"{layout.proxy_dir}/{name}", source.read_bytes(),
                        mode=0o755 if name in cmd.PROXY_ENTRY_POINTS else 0o644)


def write_compose_files(host: Host, layout: cmd.Layout) -> None:
    """compose.yml and compose.oneoff.yml (one-off containers off the slots' edge addresses)."""
    host.write_file(layout.compose_file, (cmd.DOCKER_DIR / "compose.yml").read_bytes(),
                    mode=0o644)
    write_oneoff_file(host, layout)


def write_oneoff_file(host: Host, layout: cmd.Layout) -> None:
    """compose.oneoff.yml: `compose run` with it keeps a one-off container off the slots'
    fixed edge addresses (commands._compose_one_off)."""
    host.write_file(layout.compose_oneoff_file,
                    (cmd.DOCKER_DIR / "compose.oneoff.yml").read_bytes(), mode=0o644)


def write_pgpass(settings: Settings, host: Host) -> None:
    """The database password for pg_dump, psql and the migration tools, mode 600."""
    layout = cmd.Layout(settings.remote_dir)
    host.run(cmd.private_directories(layout.root), timeout=30,
             what="creating the remote directory")
    host.write_file(layout.pgpass, cmd.pgpass_line(settings.migrate_database_url).encode(),
                    mode=0o600)


def read_slot_images(settings: Settings, host: Host) -> dict[str, str]:
    layout = cmd.Layout(settings.remote_dir)
    out = host.run(cmd.read_file(layout.slots_env), timeout=30).stdout
    values = cmd.parse_env_lines(out)
    images = {}
    for slot in ("blue", "green"):
        image = values.get(f"{slot.upper()}_IMAGE", "")
        if image and not image.endswith(":none"):
            images[slot] = image
    return images


def subnet_setting(settings: Settings) -> str:
    """Where an operator chooses the edge subnet, for the hints of its errors."""
    return (f"config/deployment.yml (proxy.subnet, per environment under "
            f"environments.{settings.env}.proxy)")


def check_edge_routes(settings: Settings, host: Host) -> None:
    """Before Compose creates the environment's edge network on this host: no route of the
    host may overlap its subnet (Docker would take those addresses over without a word). One
    round trip; nothing when the network already exists."""
    out = host.run(cmd.edge_routes(settings), timeout=30, check=False).stdout
    if edge.EDGE_EXISTS in out:
        return
    conflicts = edge.route_conflicts(settings.edge_subnet, out)
    if conflicts:
        raise CommandError(
            f"the edge network {settings.edge_subnet} of {settings.env} would take over "
            f"addresses {host.name} reaches through its route {conflicts[0]!r}"
            + (f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""),
            hint="Nothing was stopped. Choose a private /29 that no route of the host "
                 f"covers in {subnet_setting(settings)}; `ip -4 route` on the host lists its "
                 "routes.")


def start_slot(settings: Settings, host: Host, target: SlotTarget) -> None:
    """Point the slot at its image in slots.env and (re)create it with Compose (its edge
    network first checked against the host's routes)."""
    layout = cmd.Layout(settings.remote_dir)
    check_edge_routes(settings, host)
    images = read_slot_images(settings, host)
    images[target.slot] = target.image
    host.write_file(layout.slots_env, cmd.slots_env(settings, images).encode(), mode=0o644)
    # Never pull: every strategy has put the image on the host under this local name (the
    # registry one pulls by digest first); a pull here would fetch whatever a public registry
    # holds under that name.
    result = host.run(cmd.start_slot(settings, target.slot, "never"),
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
        if "pool overlaps" in text or "overlaps with" in text:
            raise CommandError(
                f"the {target.slot} slot cannot join its edge network on {host.name}: the "
                f"subnet {settings.edge_subnet} overlaps a network that is already there",
                hint="Nothing was stopped. Choose a free private /29 for this environment in "
                     f"{subnet_setting(settings)}; `docker network inspect` on the host lists "
                     "the subnets in use.", exit_status=result.exit_status)
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
    ids = host.run(cmd.slot_container_ids(settings, slot), timeout=60,
                   check=False).stdout.split()
    if not ids:
        return "missing"
    out = host.run(cmd.container_state(ids[0]), timeout=60, check=False)
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


def health_gate(settings: Settings, host: Host, target: SlotTarget, console: Console,
                cancelled: threading.Event | None = None, *, proxy_address: str | None = None
                ) -> Verdict:
    """Poll the new slot until it is healthy and runs the expected version, within the
    configured grace, interval, timeout and retries, and the overall deadline whatever the
    retries (an endpoint that never answers must not hold the deploy for retries x timeout);
    fail fast when its container dies, and give up as soon as `cancelled` is set (another
    host failed, or the operator interrupted: the fleet's answer is already no).
    With `proxy_address`, through the host's proxy there instead (a rolling deploy's gate
    after a wave's switch: the slot is up already, no startup grace)."""
    hc = settings.health
    cancelled = cancelled or threading.Event()
    deadline = time.monotonic() + hc.deadline
    if proxy_address is None:
        cancelled.wait(min(hc.startup_grace, hc.deadline))
    port = settings.ports["proxy" if proxy_address else target.slot]
    address = proxy_address or "127.0.0.1"
    verdict = unreachable("not checked")
    attempt = 0
    while attempt < hc.retries and (remaining := deadline - time.monotonic()) > 0:
        if cancelled.is_set():
            raise HealthCheckError(f"the health gate of the {target.slot} slot on {host.name} "
                                   "was cancelled")
        attempt += 1
        verdict = check_health(settings, host, port, expected_version=target.sha7,
                               timeout=min(hc.timeout, remaining), address=address)
        if verdict.status == "healthy":
            return verdict
        if verdict.status == "unreachable" or attempt % 5 == 0:
            _require_running(settings, host, target.slot)
        console.debug(f"health attempt {attempt}/{hc.retries} on {host.name}: "
                      f"{verdict.summary()}")
        if attempt < hc.retries:
            cancelled.wait(max(0.0, min(hc.interval, deadline - time.monotonic())))
    through = f" through the proxy on {host.name}" if proxy_address else ""
    raise HealthCheckError(
        f"the {target.slot} slot did not become healthy{through} after {attempt} checks in "
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
    out = host.run(cmd.slot_logs(settings, slot), timeout=60, check=False)
    lines = (out.stdout + out.stderr).strip().splitlines()[-15:]
    return "Last lines of the app's log:\n" + "\n".join("  " + line for line in lines) \
        if lines else "The app wrote no log lines."


def stop_slot(settings: Settings, host: Host, slot: str) -> None:
    host.run(cmd.stop_slot(settings, slot), timeout=settings.deployment["stop_timeout"] + 60,
             what=f"stopping the {slot} slot")
