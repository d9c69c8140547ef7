"""The nginx proxy on each host: its per-environment site configuration (`site_conf`), which
slot it routes to (a marker file nginx reads at request time), switching it to another slot
(one rename, verified through the proxy, undone on any failure), and keeping the running proxy
in line with its image, network mode and site configuration.

Why a marker and no reload: a graceful reload closes idle client keep-alive connections (wrk
saw socket errors during every deploy), and `proxy_pass http://$variable` to a host:port
opened a new upstream connection per request (throughput fell by two thirds under sustained
load, ephemeral ports in TIME_WAIT). Now each slot is an upstream group with a keep-alive pool,
the variable names the group, and the switch is a rename(2) on the host's disk: it survives a
proxy restart and a reboot, and open connections stay open.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from . import batch, edge, haproxy, tls
from . import commands as cmd
from .config import Settings
from .errors import CommandError, HealthCheckError, HostError, TogatherError
from .health import running_version
from .hosts import Host, HttpResponse
from .signals import shielded

SLOTS = ("blue", "green")
# The header that lets the tool's own check through maintenance mode; its value is a random
# token per host (verify.map, mode 600), never a well-known one.
VERIFY_HEADER = "X-Togather-Verify"
# Polls of togather.lua waited for after the marker is put back (restore).
RESTORE_SEEN_POLLS = 5
_LEGACY_SLOT = re.compile(r"\$togather_slot \{\s*default (blue|green);")
_TOKEN = re.compile(r'^"([0-9a-f]{32,})" 1;$', re.MULTILINE)
_DIRECTIVE = re.compile(r"^[ \t]*(listen|server|keepalive|client_max_body_size|"
                        r"proxy_read_timeout) (\S+)[^;{\n]*;", re.MULTILINE)


# --- the site configuration (pure) ------------------------------------------------------------


def upstream_block(slot: str, server: str, keepalive: int) -> str:
    """One slot's upstream group: its address on the edge network (edge.py; the published
    port on the host's loopback for a container from before that network) and a pool of idle
    keep-alive connections per worker, each used for up to 10,000 requests (nginx's default,
    1,000, left ~300 sockets in TIME_WAIT per minute of load). The app keeps idle connections
    longer (75 s in the demo) than nginx does here, so nginx never reuses one the app is
    closing."""
    return (f"upstream togather_{slot} {{\n"
            f"    server {server};\n"
            f"    keepalive {keepalive};\n"
            f"    keepalive_requests 10000;\n"
            f"    keepalive_timeout 30s;\n"
            f"}}\n")


def slot_server(settings: Settings, slot: str, legacy: frozenset[str] = frozenset()) -> str:
    """Where nginx reaches `slot`: its edge address and the app's port, or (a container not
    on the edge network yet) its published port on 127.0.0.1."""
    if slot in legacy:
        return f"127.0.0.1:{settings.ports[slot]}"
    return f"{settings.edge_address(slot)}:{settings.app_port}"


def listen_address(settings: Settings, port: int | None = None) -> str:
    bind, port = settings.proxy["bind"], port or settings.ports["proxy"]
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def app_limits(settings: Settings) -> str:
    """Server-level lines of every server block, inherited by togather-app.conf's location:
    the largest request body passed to the app (proxy.max_body_size) and how long the proxy
    waits between two reads of the app's answer (proxy.read_timeout)."""
    return (f"    client_max_body_size {settings.proxy['max_body_size']};\n"
            f"    proxy_read_timeout {settings.proxy['read_timeout']}s;\n")


def http_server(settings: Settings) -> str:
    """The plain-HTTP server: the app through the shared include; with HTTPS on, the ACME
    challenge path and (by default) a redirect to HTTPS instead of the app (tls.py)."""
    return ("server {\n"
            f"    listen {listen_address(settings)} default_server;\n"
            f"{app_limits(settings)}"
            f"{tls.http_locations(settings.tls)}"
            "}\n")


def server_blocks(settings: Settings) -> list[str]:
    """The site's server blocks, in order: plain HTTP, then HTTPS when proxy.tls is on (in a
    fleet with ACME, after the peers the challenges are forwarded to: tls.py)."""
    if settings.tls is None:
        return [http_server(settings)]
    peers = tls.acme_peers_block(settings.tls)
    return [*([peers] if peers else []), http_server(settings),
            tls.https_server_block(settings.tls,
                                   listen_address(settings, settings.tls.https_port),
                                   app_limits(settings))]


def site_conf(settings: Settings, legacy: frozenset[str] = frozenset()) -> str:
    """The environment's site.conf (included in the http block of the image's nginx.conf):
    one upstream group per slot and the server blocks. `legacy`: the slots whose container
    is not on the edge network (edge.parse_slot_networks). Changing it is the only change
    that needs `nginx -t && nginx -s reload`; the switch never does."""
    if cmd.proxy_engine(settings) == "haproxy":
        return haproxy.site_conf(
            settings.env, settings.proxy,
            {slot: slot_server(settings, slot, legacy) for slot in SLOTS},
            haproxy.bind_address(settings.proxy["bind"], settings.ports["proxy"]),
            settings.tls,
            haproxy.bind_address(settings.proxy["bind"], settings.tls.https_port)
            if settings.tls else None)
    keepalive = settings.proxy["keepalive"]
    blocks = [upstream_block(slot, slot_server(settings, slot, legacy), keepalive)
              for slot in SLOTS]
    return (f"# Written by togather-tasks for the {settings.env} environment; rewritten by "
            "every deploy.\n" + "\n".join([*blocks, *server_blocks(settings)]))


def site_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def directives(text: str) -> list[tuple[str, str]]:
    """The site's directives worth naming when they change, `(what, value)`, in order, for
    either engine's site.conf (haproxy.py's says so in its first line)."""
    if "proxy.engine: haproxy" in text.partition("\n")[0]:
        return haproxy.directives(text)
    return _DIRECTIVE.findall(text)


def site_changes(old: str, new: str) -> str:
    """What changed between two site.conf texts, for the operator: `listen A -> B`, ..."""
    before, after = directives(old), directives(new)
    if not old.strip():
        return "site.conf written"
    if len(before) != len(after):
        return "site.conf changed"
    changed = [f"{kind} {was} -> {now}" for (kind, was), (_, now) in zip(before, after,
                                                                        strict=True)
               if was != now]
    return ", ".join(changed) or "site.conf changed"


def verify_map(token: str) -> str:
    """The map entry nginx.conf includes: this token (and no other value) is verified."""
    return f'"{token}" 1;\n'


def token_in(text: str) -> str | None:
    match = _TOKEN.search(text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Routes:
    """What a host's disk says about its proxy: the slot marker (None: none yet), the slot
    of a pre-marker upstream file (a host deployed by an older version), maintenance on."""

    marker: str | None
    legacy: str | None
    maintenance: bool

    @property
    def slot(self) -> str | None:
        return self.marker or self.legacy


def parse_routes(output: str) -> Routes:
    """commands.read_routes's output."""
    names, _, legacy = output.partition("--\n")
    entries = set(names.split())
    marker = "green" if "green" in entries else "blue" if "blue" in entries else None
    match = _LEGACY_SLOT.search(legacy)
    return Routes(marker, match.group(1) if match else None, "maintenance" in entries)


# --- on a host ----------------------------------------------------------------------------


def ensure_image(settings: Settings, host: Host, timeout: float) -> bool:
    """Build the proxy image on the host if it is not there yet. True when it was built."""
    image = cmd.proxy_image_ref(cmd.proxy_engine(settings))
    if host.run(cmd.image_exists(image), check=False).ok:
        return False
    host.run(cmd.build_proxy_image(image, cmd.Layout(settings.remote_dir).proxy_dir),
             timeout=timeout,
             what=f"building the {cmd.proxy_engine(settings)} proxy image")
    return True


def read_routes(settings: Settings, host: Host) -> Routes:
    return parse_routes(host.run(cmd.read_routes(cmd.Layout(settings.remote_dir)),
                                 timeout=30).stdout)


def address(settings: Settings) -> str:
    bind = settings.proxy["bind"]
    if bind == "0.0.0.0":  # noqa: S104 - comparing, not binding
        return "127.0.0.1"
    return "::1" if bind == "::" else bind


def routed_slot(settings: Settings, host: Host) -> str | None:
    """The slot this host's proxy routes to: its marker, which nginx reads on every request
    (whether the proxy runs or not: it is what it serves when it comes back); on a host not
    yet taken over, the slot of its old upstream file. None: no slot (first deploy)."""
    return read_routes(settings, host).slot


def serving_slot(settings: Settings, host: Host) -> str | None:
    """The slot nginx serves right now: the marker is read at request time, so what the
    disk says is what it serves."""
    return routed_slot(settings, host)


def changes(settings: Settings, inspected: str) -> list[str]:
    """How the running proxy (commands.running_proxy's output) differs from what a recreate
    would start, one phrase per difference; empty when it matches. The listen address and
    the slots' addresses are in site.conf (a reload, see apply_config); nginx's worker count
    (proxy.workers, `default`: one per four cores) is on its command line and the CPU cgroup
    parent (commands.PROXY_CGROUP_PROBE) in the container's settings (a recreate)."""
    image, mode, *pairs = [*inspected.split(), "", ""]
    fields = dict(pair.partition("=")[::2] for pair in pairs if pair)
    wanted = {"image": cmd.proxy_image_ref(cmd.proxy_engine(settings)), "network": "host",
              "workers": cmd.proxy_workers(settings) or "default",
              "cgroup": fields.get("own") or "Docker's"}
    running = {"image": image, "network": mode or "?",
               "workers": fields.get("workers") or "default",
               "cgroup": fields.get("cgroup") or "Docker's"}
    return [f"{what} {running[what]} -> {value}" for what, value in wanted.items()
            if running[what] != value]


@dataclass(frozen=True)
class Site:
    """The site configuration this run wants, and what is on the host."""

    text: str
    on_host: str
    digest: str  # of the site and the token: what site.loaded records once nginx loaded both
    stale: bool  # the running nginx (if any) did not load them


def write_site(settings: Settings, host: Host, files: str | None = None) -> tuple[Site, str]:
    """Put site.conf and the verification token on the host (the token made once per host)
    and say whether nginx has to load them (a new site, a token it never loaded). `files`:
    commands.proxy_files's output when the caller already read it. Returns the site and the
    token."""
    layout = cmd.Layout(settings.remote_dir)
    out = (files if files is not None
           else host.run(cmd.proxy_files(settings), timeout=30).stdout)
    networks, _, out = out.partition("--\n")
    legacy = frozenset(edge.parse_slot_networks(networks, settings.compose_project))
    loaded, _, rest = out.partition("\n")
    mapping, _, on_host = rest.partition("--\n")
    token = token_in(mapping)
    if token is None:
        token = secrets.token_hex(16)
        host.write_file(layout.verify_map, verify_map(token).encode(), mode=0o600)
    text = site_conf(settings, legacy)
    digest = site_digest(text + verify_map(token))
    site = Site(text, on_host, digest, stale=loaded.strip() != digest)
    if on_host != text:
        host.write_file(layout.site_file, text.encode(), mode=0o644)
    return site, token


def take_over(settings: Settings, host: Host, routes: Routes) -> None:
    """A host deployed before the marker: mark the slot its old upstream file routes to, so
    the new proxy serves what the old one did until the switch moves it."""
    if routes.marker is None and routes.legacy is not None:
        host.run(cmd.mark_slot(cmd.Layout(settings.remote_dir), routes.legacy), timeout=30,
                 what="marking the slot the old proxy served")


def apply_config(settings: Settings, host: Host, site: Site,
                 inspected: str | None = None) -> str:
    """Make the running proxy serve this configuration: start it when it is not running
    (first deploy, host rebooted), recreate it when its image or network mode differ (a
    package upgrade, a host deployed by an older version), else reload it when the site
    changed (`nginx -t` first; a failed test puts the old site.conf back). `inspected`:
    commands.running_proxy's output when the caller already read it. Returns what happened:
    `started`, `recreated (...)`, `reloaded (...)` or `unchanged`."""
    layout = cmd.Layout(settings.remote_dir)
    if inspected is None:
        inspected = host.run(cmd.running_proxy(settings), timeout=60, check=False).stdout
    if not inspected.strip():
        host.run(cmd.start_proxy(settings), timeout=300,
                 what=f"starting the {cmd.proxy_engine(settings)} proxy")
        how = "started"
    elif differences := changes(settings, inspected):
        host.run(cmd.start_proxy(settings, recreate=True), timeout=300,
                 what=f"recreating the {cmd.proxy_engine(settings)} proxy")
        how = f"recreated ({', '.join(differences)})"
    elif site.stale:
        result = host.run(cmd.reload_proxy(settings), timeout=60, check=False)
        if not result.ok:
            if site.on_host and site.on_host != site.text:
                host.write_file(layout.site_file, site.on_host.encode(), mode=0o644)
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            test = cmd.engine_of(settings).config_test
            raise CommandError(f"{test} (configuration test) or reload failed on "
                               f"{host.name}: {detail}", exit_status=result.exit_status)
        how = f"reloaded ({site_changes(site.on_host, site.text)})"
    else:
        return "unchanged"
    host.write_file(layout.site_loaded, f"{site.digest}\n".encode(), mode=0o644)
    return how


# The pauses between verify's requests: the first request goes at once (the marker is read
# per request, so it almost always answers right), then a short back-off for a proxy that is
# just (re)starting, capped at the 0.25 s every pause used to be.
VERIFY_FIRST_PAUSE = 0.02
VERIFY_MAX_PAUSE = 0.25


def verify_pauses(attempts: int) -> list[float]:
    """The pause after each failed request but the last: 0.02, 0.04, 0.08, 0.16, 0.25, ...
    (attempts - 1 pauses; 20 attempts wait 4.05 s in all at most, besides the requests)."""
    return [min(VERIFY_MAX_PAUSE, VERIFY_FIRST_PAUSE * 2 ** n) for n in range(attempts - 1)]


def verify(settings: Settings, host: Host, slot: str, version: str | None,
           token: str | None = None) -> str | None:
    """Ask the proxy until a fresh connection lands on `slot` (running `version`, when
    known); with the host's token, through maintenance mode too. At most verify_attempts
    requests (verify_pauses between them). Returns None on success, else what was seen
    last."""
    last = "no answer"
    headers = {VERIFY_HEADER: token} if token else None
    pauses = [*verify_pauses(settings.proxy["verify_attempts"]), None]
    for pause in pauses:
        try:
            resp = _get(settings, host, settings.version_endpoint or settings.health_endpoint,
                        headers)
            seen_slot = resp.headers.get("x-togather-slot")
            # Without a version endpoint (an http-mode app) the slot header alone tells.
            seen_version = running_version(resp.body) if settings.version_endpoint else None
            if resp.status == 200 and seen_slot == slot and (
                    version is None or not settings.version_endpoint or seen_version == version):
                return None
            last = f"HTTP {resp.status}, slot {seen_slot}, version {seen_version}"
        except (OSError, ConnectionError, HostError) as exc:
            last = str(exc)
        if pause is not None:
            time.sleep(pause)
    return last


def get_through(settings: Settings, host: Host, path: str) -> HttpResponse:
    """One request through the host's proxy as a client makes it (no verification token)."""
    return _get(settings, host, path, None)


def _get(settings: Settings, host: Host, path: str,
         headers: dict[str, str] | None) -> HttpResponse:
    """A request through the proxy as a client makes it: over HTTPS (SNI = the first domain,
    the certificate not verified: inv health reports on it) when plain HTTP redirects."""
    if settings.tls is not None and settings.tls.redirect:
        return host.https_get(address(settings), settings.tls.https_port, path, timeout=5,
                              server_name=settings.tls.server_name,
                              context=tls.probe_context(), headers=headers)
    return host.http_get(address(settings), settings.ports["proxy"], path, timeout=5,
                         headers=headers)


@dataclass(frozen=True)
class Switched:
    """A switch that succeeded on one host: what happened to the proxy itself (`started`,
    `unchanged`, `reloaded (...)`, `recreated (...)`), the slot it routed to before (what
    switching back marks; None on a first deploy), and whether maintenance mode is on."""

    how: str
    previous: str | None
    maintenance: bool = False

    def notes(self) -> list[str]:
        """What the operator should hear about this host's switch."""
        notes = []
        if self.how.startswith("recreated"):
            notes.append(f"the proxy was {self.how} to apply its configuration: "
                         "connections were refused for about a second")
        elif self.how.startswith("reloaded"):
            notes.append(f"the proxy was {self.how}: its site configuration changed")
        if self.maintenance:
            notes.append("maintenance mode is on and stays on: the proxy answers 503 with "
                         "the maintenance page (inv maintenance.off ends it)")
        return notes


def switch(settings: Settings, host: Host, slot: str, version: str | None) -> Switched:
    """Route the host's proxy to `slot`: the site configuration in place (the proxy started,
    recreated or reloaded only if that changed), then one rename of the slot marker, then a
    check through the proxy that `slot` (running `version`, when known) answers. On any
    failure, Ctrl-C and SIGTERM included, the marker goes back, so traffic stays on (or
    returns to) the old slot."""
    layout = cmd.Layout(settings.remote_dir)
    # What the switch reads first, in one round trip: the marker, the proxy's files, and
    # whether (and as what) the proxy runs.
    probes = batch.run_batch(host, {"routes": cmd.read_routes(layout),
                                    "files": cmd.proxy_files(settings),
                                    "proxy": cmd.running_proxy(settings)},
                             timeout=60, what="reading the proxy's state")
    routes = parse_routes(probes["routes"].output)
    previous = routes.slot
    try:
        site, token = write_site(settings, host, probes["files"].output)
        take_over(settings, host, routes)
        how = apply_config(settings, host, site, probes["proxy"].output)
        host.run(cmd.mark_slot(layout, slot), timeout=30, what=f"marking the {slot} slot")
        seen = verify(settings, host, slot, version, token)
        if seen is not None:
            raise HealthCheckError(
                f"after the switch the proxy does not serve {slot}/{version or 'any version'} "
                f"(last answer: {seen})" + (proxy_log_line(settings, host)
                                            if how != "unchanged" else ""))
    except BaseException as exc:
        with shielded():
            restore(settings, host, previous)
        if isinstance(exc, TogatherError) and not isinstance(exc, HealthCheckError):
            raise HealthCheckError(f"switching traffic to {slot} failed: {exc.message}",
                                   hint="The previous slot marker was restored; traffic "
                                        "stays on the old slot.") from None
        raise
    if routes.legacy is not None:
        host.run(cmd.remove_trees(layout.upstream_dir), timeout=30, check=False)
    return Switched(how, previous, routes.maintenance)


def proxy_log_line(settings: Settings, host: Host) -> str:
    """The proxy's last error line, for a proxy just (re)started or reloaded that does not
    answer (its port taken by another program, for one)."""
    out = host.run(cmd.logs_command(settings, "proxy", lines=5), timeout=60, check=False)
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines()
             if any(mark in line for mark in ("[emerg]", "[error]", "[ALERT]"))]
    return f"; {cmd.proxy_engine(settings)} says: {lines[-1][:300]}" if lines else ""


def restore(settings: Settings, host: Host, previous: str | None) -> None:
    """The marker as it was: `previous` marked, or no marker at all (the proxy then defaults
    to blue, on a host where nothing was routed before). With HAProxy, which sees the marker
    within one poll of togather.lua, it returns after a few polls more, so the slot the
    caller stops next gets no new request (nginx reads the marker at each request)."""
    layout = cmd.Layout(settings.remote_dir)
    command = cmd.mark_slot(layout, previous) if previous else cmd.unmark_slots(layout)
    host.run(command, timeout=30, check=False)
    if poll := cmd.engine_of(settings).file_poll:
        time.sleep(RESTORE_SEEN_POLLS * poll)


def switch_back(settings: Settings, host: Host, previous: str | None,
                version: str | None) -> None:
    """Undo a switch that succeeded on this host (another host's failed): the previous slot
    marked again, verified through the proxy before anything may be stopped. A host whose
    proxy routed nowhere before (first deploy) keeps the new slot: there is nothing to go
    back to, and the failure path leaves a routed slot running."""
    if previous is None:
        return
    restore(settings, host, previous)
    token = token_in(host.run(cmd.read_file(cmd.Layout(settings.remote_dir).verify_map),
                              timeout=30).stdout)
    seen = verify(settings, host, previous, version, token)
    if seen is not None:
        raise HealthCheckError(f"{host.name}: switching back to {previous} could not be "
                               f"verified (last answer: {seen})")
