"""The nginx proxy on each host: which slot it routes to, switching it to another slot (write
the upstream, `nginx -t`, graceful reload, verify through the proxy, restore on any failure),
and keeping the running proxy in line with its configured image, port and bind address."""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass

from . import commands as cmd
from .config import Settings
from .errors import CommandError, HealthCheckError, HostError, TogatherError
from .health import running_version
from .hosts import Host
from .signals import shielded

_UPSTREAM_SLOT = re.compile(r"\$togather_slot \{\s*default (blue|green);")


def ensure_image(settings: Settings, host: Host, timeout: float) -> bool:
    """Build the proxy image on the host if it is not there yet. True when it was built."""
    image = cmd.proxy_image_ref()
    if host.run(cmd.image_exists(image), check=False).ok:
        return False
    host.run(cmd.build_proxy_image(image, cmd.Layout(settings.remote_dir).proxy_dir),
             timeout=timeout,
             what="building the nginx proxy image")
    return True


def read_upstream(settings: Settings, host: Host) -> str:
    return host.run(cmd.read_file(cmd.Layout(settings.remote_dir).upstream_file),
                    timeout=30).stdout


def upstream_slot(upstream: str) -> str | None:
    """The slot an upstream file (see commands.upstream_conf) routes to, if any."""
    match = _UPSTREAM_SLOT.search(upstream)
    return match.group(1) if match else None


def address(settings: Settings) -> str:
    bind = settings.proxy["bind"]
    return "127.0.0.1" if bind == "0.0.0.0" else bind  # noqa: S104 - comparing, not binding


def serving_slot(settings: Settings, host: Host) -> str | None:
    """The slot nginx really routes to right now (its X-Togather-Slot header), or None when
    no proxy answers (first deploy). The state file can lag behind after a crash between the
    switch and the record step; building into the slot that is serving would be an outage."""
    try:
        resp = host.http_get(address(settings), settings.ports["proxy"],
                             settings.version_endpoint or settings.health_endpoint, timeout=5)
    except (OSError, ConnectionError, HostError):
        return None
    except Exception:  # noqa: BLE001 - a proxy answering garbage tells us nothing
        return None
    slot = resp.headers.get("x-togather-slot")
    return slot if slot in ("blue", "green") else None


def routed_slot(settings: Settings, host: Host) -> str | None:
    """The slot this host's proxy routes to: what it answers, else (proxy down) what its
    upstream file says and it will load when it comes back. None: no slot (first deploy)."""
    return serving_slot(settings, host) or upstream_slot(read_upstream(settings, host))


def changes(settings: Settings, inspected: str) -> list[str]:
    """How the running proxy (commands.running_proxy's output) differs from the
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


def apply_config(settings: Settings, host: Host) -> str:
    """Make the running proxy serve the upstream file with the configured settings: start it
    when it is not running (first deploy, host rebooted), recreate it when its image, port or
    bind address differ from the configuration (package upgrade, deployment.yml edited: a
    reload cannot move a published port), else `nginx -t` and a graceful reload. Returns what
    happened: `reloaded`, `started` or `recreated (what changed)`."""
    inspected = host.run(cmd.running_proxy(settings), timeout=60, check=False).stdout
    if not inspected.strip():
        host.run(cmd.start_proxy(settings), timeout=300, what="starting the nginx proxy")
        return "started"
    differences = changes(settings, inspected)
    if differences:
        host.run(cmd.start_proxy(settings, recreate=True), timeout=300,
                 what="recreating the nginx proxy")
        return f"recreated ({', '.join(differences)})"
    result = host.run(cmd.reload_proxy(settings), timeout=60, check=False)
    if not result.ok:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommandError(f"nginx -t (configuration test) or reload failed on {host.name}: "
                           f"{detail}", exit_status=result.exit_status)
    return "reloaded"


def verify(settings: Settings, host: Host, slot: str, version: str | None) -> str | None:
    """Ask the proxy until a fresh connection lands on `slot` (running `version`, when
    known). Returns None on success, else what was seen last."""
    last = "no answer"
    for _ in range(settings.proxy["verify_attempts"]):
        try:
            resp = host.http_get(address(settings), settings.ports["proxy"],
                                 settings.version_endpoint or settings.health_endpoint,
                                 timeout=5)
            seen_slot = resp.headers.get("x-togather-slot")
            # Without a version endpoint (an http-mode app) the slot header alone tells.
            seen_version = running_version(resp.body) if settings.version_endpoint else None
            if resp.status == 200 and seen_slot == slot and (
                    version is None or not settings.version_endpoint or seen_version == version):
                return None
            last = f"HTTP {resp.status}, slot {seen_slot}, version {seen_version}"
        except (OSError, ConnectionError, HostError) as exc:
            last = str(exc)
        time.sleep(0.25)
    return last


@dataclass(frozen=True)
class Switched:
    """A switch that succeeded on one host: how the proxy took it, and the upstream it
    replaced (what switching back writes)."""

    how: str
    previous: str


def switch(settings: Settings, host: Host, slot: str, version: str | None) -> Switched:
    """Write the upstream for `slot`, test, reload, verify that `slot` (running `version`,
    when known) answers; on any failure, Ctrl-C and SIGTERM included, put the old upstream
    back so traffic stays on (or returns to) the old slot."""
    layout = cmd.Layout(settings.remote_dir)
    previous = read_upstream(settings, host)
    host.write_file(layout.upstream_file, cmd.upstream_conf(settings, slot).encode(),
                    mode=0o644)
    try:
        how = apply_config(settings, host)
        seen = verify(settings, host, slot, version)
        if seen is not None:
            raise HealthCheckError(
                f"after the switch the proxy does not serve {slot}/{version or 'any version'} "
                f"(last answer: {seen})")
    except BaseException as exc:
        with shielded():
            restore(settings, host, previous)
        if isinstance(exc, TogatherError) and not isinstance(exc, HealthCheckError):
            raise HealthCheckError(f"switching traffic to {slot} failed: {exc.message}",
                                   hint="The previous nginx upstream was restored; traffic "
                                        "stays on the old slot.") from None
        raise
    return Switched(how, previous)


def restore(settings: Settings, host: Host, previous: str) -> None:
    layout = cmd.Layout(settings.remote_dir)
    if previous:
        host.write_file(layout.upstream_file, previous.encode(), mode=0o644)
        # If this fails, the running nginx never loaded the bad config: it still serves the
        # old slot.
        with contextlib.suppress(TogatherError):
            apply_config(settings, host)
    else:
        host.run(cmd.remove_files(layout.upstream_file), timeout=30, check=False)


def switch_back(settings: Settings, host: Host, previous: str, version: str | None) -> None:
    """Undo a switch that succeeded on this host (another host's failed): the previous
    upstream again, verified through the proxy before anything may be stopped. A host whose
    proxy routed nowhere before (first deploy) keeps the new slot: there is nothing to go
    back to, and the failure path leaves a routed slot running."""
    slot = upstream_slot(previous)
    if slot is None:
        return
    restore(settings, host, previous)
    seen = verify(settings, host, slot, version)
    if seen is not None:
        raise HealthCheckError(f"{host.name}: switching back to {slot} could not be verified "
                               f"(last answer: {seen})")
