"""Command lines and generated files for docker, compose, nginx, pg_dump and the migration tools.

Pure functions: every value is quoted here (shlex.quote), nothing runs here, and the unit tests
assert the exact strings. Secrets never appear in these strings: database passwords reach
pg_dump, psql and the migration tools through a mode-600 PGPASSFILE, app secrets through app.env.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote

from . import edge, haproxy
from .config import DEFAULTS, Settings, database_parts
from .errors import StateError

q = shlex.quote
DOCKER_DIR = Path(__file__).parent / "docker"
# The files each proxy engine's image is built from (in DOCKER_DIR/<engine>); its tag hashes
# them. proxy.engine picks one (nginx by default).
PROXY_IMAGE_FILES = {
    "nginx": ("Dockerfile", "nginx.conf", "togather-app.conf", "togather-nginx"),
    "haproxy": ("Dockerfile", "haproxy.cfg", "togather.lua", "togather-haproxy"),
}
PROXY_ENTRY_POINTS = ("togather-nginx", "togather-haproxy")
SECRET_QUERY_KEYS = frozenset({"password", "passfile", "sslpassword"})
# The state schema's image_ref: no blank, quote, `=`, `$` or line break.
IMAGE_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,511}")
# Connection settings a DATABASE_URL may carry in its query, and the libpq variable that says
# the same to pg_dump, pg_restore and psql (which take no URL here: they get PG* variables).
LIBPQ_QUERY_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "sslcompression": "PGSSLCOMPRESSION",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "gssencmode": "PGGSSENCMODE",
    "channel_binding": "PGCHANNELBINDING",
    "krbsrvname": "PGKRBSRVNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "application_name": "PGAPPNAME",
    "options": "PGOPTIONS",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}
# libpq's own default: without it the migration tools' driver (lib/pq) would assume `require`,
# and pg_dump and the migration tool must agree on one rule.
DEFAULT_SSLMODE = "prefer"


@dataclass(frozen=True)
class Layout:
    """Where things live under the remote directory of one environment."""

    root: str

    @property
    def compose_file(self) -> str:
        return f"{self.root}/compose.yml"

    @property
    def slots_env(self) -> str:
        return f"{self.root}/slots.env"

    @property
    def compose_oneoff_file(self) -> str:
        return f"{self.root}/compose.oneoff.yml"

    @property
    def app_env(self) -> str:
        return f"{self.root}/app.env"

    @property
    def pgpass(self) -> str:
        return f"{self.root}/.pgpass"

    @property
    def proxy_conf_dir(self) -> str:
        """Mounted read-only in the proxy at /etc/nginx/togather (compose.yml): site.conf,
        verify.map, state/, and (HTTPS) tls/ and acme/."""
        return f"{self.root}/nginx"

    @property
    def site_file(self) -> str:
        return f"{self.proxy_conf_dir}/site.conf"

    @property
    def site_loaded(self) -> str:
        """The sha256 of the site.conf the running nginx last loaded (start, reload)."""
        return f"{self.proxy_conf_dir}/site.loaded"

    @property
    def verify_map(self) -> str:
        return f"{self.proxy_conf_dir}/verify.map"

    @property
    def proxy_state_dir(self) -> str:
        """Read by nginx at request time: the slot marker and the maintenance link."""
        return f"{self.proxy_conf_dir}/state"

    def slot_marker(self, slot: str) -> str:
        return f"{self.proxy_state_dir}/{slot}"

    @property
    def maintenance_link(self) -> str:
        return f"{self.proxy_state_dir}/maintenance"

    @property
    def maintenance_pages(self) -> str:
        return f"{self.proxy_state_dir}/pages"

    @property
    def upstream_dir(self) -> str:
        """The layout before the no-reload switch (read once, to take a host over)."""
        return f"{self.proxy_conf_dir}/upstream"

    @property
    def upstream_file(self) -> str:
        return f"{self.upstream_dir}/active.conf"

    @property
    def proxy_dir(self) -> str:
        return f"{self.root}/proxy"

    @property
    def releases(self) -> str:
        return f"{self.root}/releases"

    def release(self, sha7: str) -> str:
        return f"{self.releases}/{sha7}"


def private_directories(root: str, *inside: str) -> str:
    """Create the remote directory (and its parents, and `inside` it) closed to other local
    users, and close it when an older version left it 0755: with no access for others to the
    root, nothing under it is reachable whatever its own mode. The group keeps read access
    (an operator's group on the host); Docker's daemon, the proxy's root master and pg_dump
    (run as the deploy user) need none."""
    directories = " ".join(q(d) for d in (root, *inside))
    return f"umask 027 && mkdir -p {directories} && chmod o-rwx {q(root)}"


def host_directories(layout: Layout) -> str:
    """Every directory a deploy writes into on a host."""
    return (private_directories(layout.root, layout.releases, layout.proxy_dir) + " && "
            + proxy_directories(layout))


def proxy_directories(layout: Layout) -> str:
    """The directory mounted in the proxy and its state directories. nginx's workers
    (www-data inside the proxy) test the state files at request time and serve the
    maintenance pages, so these let others through: others on the host still cannot reach
    them, the remote directory above is closed to them."""
    opened = " ".join(q(d) for d in (layout.proxy_conf_dir, layout.proxy_state_dir,
                                     layout.maintenance_pages))
    return (f"umask 027 && mkdir -p {q(layout.proxy_state_dir)} {q(layout.maintenance_pages)}"
            f" && chmod 755 {opened}")


def make_open_dir(path: str) -> str:
    return f"umask 022 && mkdir -p {q(path)}"


def image_ref(settings: Settings, sha7: str) -> str:
    return f"{settings.image}:{sha7}"


def registry_ref(settings: Settings, sha7: str) -> str:
    """Where the registry strategy pushes the image: `build.registry` + the image's name."""
    return f"{settings.build['registry'].rstrip('/')}/{image_ref(settings, sha7)}"


def registry_host(ref: str) -> str:
    """The registry an image reference names, by Docker's rule: a first component holding a
    `.` or a `:` (or `localhost`) is a registry; anything else lives on Docker Hub."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def digest_ref(ref: str, digest: str) -> str:
    """`registry/repo:tag` + `sha256:...` -> `registry/repo@sha256:...` (the tag dropped: a
    pull by digest gets exactly the pushed content, whatever the tag points to now)."""
    repository = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    return f"{repository}@{digest}"


def parse_push_digest(output: str) -> str | None:
    """The digest `docker push` reports last (`<tag>: digest: sha256:<hex> size: <n>`)."""
    found = re.findall(r"digest: (sha256:[0-9a-f]{64})", output)
    return found[-1] if found else None


def docker_env(config_dir: str | None) -> str:
    """The prefix that points docker at a per-operation config directory (its credentials)."""
    return f"DOCKER_CONFIG={q(config_dir)} " if config_dir else ""


def docker_config_dir_command(parent: str | None) -> str:
    """A new private (mode 700, mktemp's own) directory for one operation's docker
    credentials: under the environment's directory on a host (where a directory left by a
    killed run is removed first: the lock makes this run the only one), else in $TMPDIR."""
    if parent is None:
        return "mktemp -d -t togather-docker-config.XXXXXXXX"
    pattern = f"{parent}/.docker-config."
    return (f"mkdir -p {q(parent)} && rm -rf {q(pattern)}* && "
            f"mktemp -d {q(pattern + 'XXXXXXXX')}")


def docker_login_command(config_dir: str, registry: str) -> str:
    """`docker login` with the user name on the first line of standard input and the password
    on the rest: neither is ever part of a command line we build or log."""
    return (f"IFS= read -r user && {docker_env(config_dir)}docker login --username \"$user\" "
            f"--password-stdin {q(registry)}")


def docker_tag_command(source: str, target: str) -> str:
    return f"docker tag {q(source)} {q(target)}"


def docker_push_command(image: str, remote: str, config_dir: str | None) -> str:
    return f"{docker_tag_command(image, remote)} && {docker_env(config_dir)}docker push {q(remote)}"


def docker_pull_command(by_digest: str, image: str, config_dir: str | None) -> str:
    """Pull exactly the pushed content, then give it the slot's local name for compose."""
    return (f"{docker_env(config_dir)}docker pull --quiet {q(by_digest)} && "
            f"{docker_tag_command(by_digest, image)}")


def image_exists_command(image: str) -> str:
    return f"docker image inspect --format '{{{{.Id}}}}' {q(image)} > /dev/null"


def proxy_workers(settings: Settings) -> str:
    """proxy.workers as togather-nginx reads it: a number, `auto`, or empty (one per four
    cores, at least one)."""
    return str(settings.proxy.get("workers") or "")


def proxy_engine(settings: Settings) -> str:
    """proxy.engine: `haproxy` (the default, config.DEFAULTS) or `nginx`."""
    return str(settings.proxy.get("engine") or DEFAULTS["proxy"]["engine"])


@dataclass(frozen=True)
class ProxyEngine:
    """How one proxy engine takes the changes the tool makes, where the engines differ."""

    # Run in the proxy container: test the configuration, then reload without failing a
    # request (nginx: graceful; HAProxy: seamless, togather-haproxy keeps every connection).
    reload: str
    config_test: str  # named in the error when a reload is refused
    # How late the proxy may see a file the tool changed (the slot marker, the maintenance
    # link): HAProxy's togather.lua polls them; nginx reads them at each request (None).
    file_poll: float | None
    # nginx reads tls/site.pem at each TLS handshake, in two opens (the certificate, then the
    # key): a new certificate needs no reload, and a renewal must keep the key (tls.acme_env).
    # HAProxy reads the file in one go when it (re)loads: a new certificate needs a reload.
    reads_certificate_per_handshake: bool


ENGINES = {
    "nginx": ProxyEngine(reload="nginx -t -q && nginx -s reload", config_test="nginx -t",
                         file_poll=None, reads_certificate_per_handshake=True),
    "haproxy": ProxyEngine(reload="togather-haproxy reload", config_test="haproxy -c",
                           file_poll=haproxy.POLL, reads_certificate_per_handshake=False),
}


def engine_of(settings: Settings) -> ProxyEngine:
    return ENGINES[proxy_engine(settings)]


def proxy_image_ref(engine: str) -> str:
    """Tagged by content so a changed configuration, entry point or Dockerfile (or another
    engine) builds a new proxy image (and recreates the proxy: see proxy.changes)."""
    digest = hashlib.sha256()
    for name in PROXY_IMAGE_FILES[engine]:
        digest.update((DOCKER_DIR / engine / name).read_bytes())
    return f"togather-proxy:{digest.hexdigest()[:12]}"


def compose(settings: Settings, *args: str) -> str:
    return _compose_without_slots(settings, "--env-file", q(Layout(settings.remote_dir).slots_env),
                                  *args)


def _compose_without_slots(settings: Settings, *args: str) -> str:
    layout = Layout(settings.remote_dir)
    return " ".join([
        "docker", "compose", "--project-name", q(settings.compose_project),
        "--project-directory", q(layout.root), "--file", q(layout.compose_file), *args])


def _compose_one_off(settings: Settings, *args: str) -> str:
    """Compose for `run`: compose.yml plus compose.oneoff.yml, which keeps the one-off
    container off the slots' fixed edge addresses (put on the host with compose.yml by every
    deploy, and by `inv exec` before it runs one)."""
    layout = Layout(settings.remote_dir)
    return _compose_without_slots(settings, "--file", q(layout.compose_oneoff_file), *args)


def service(slot: str) -> str:
    return f"app-{slot}"


def start_slot(settings: Settings, slot: str, pull: str) -> str:
    """(Re)create one slot; `pull` is Compose's --pull policy (slots.start_slot: never)."""
    return compose(settings, "up", "--detach", "--no-deps", "--pull", pull, service(slot))


def service_containers(settings: Settings, service_name: str, *, running: bool = False) -> str:
    """The ids of a service's containers (running ones only, with `running`), newest first,
    found by the labels Compose puts on them: `docker ps` answers in ~0.02 s where `docker
    compose ps` spends ~0.1 s loading the project. One-off containers (`compose run`: the
    migrations, `inv exec --slot=new`) are not the service's."""
    filters = [f"label={label}" for label in (
        f"com.docker.compose.project={settings.compose_project}",
        f"com.docker.compose.service={service_name}",
        "com.docker.compose.oneoff=False")]
    return " ".join(["docker ps", "--quiet", *([] if running else ["--all"]),
                     *(f"--filter {q(f)}" for f in filters)])


def slot_networks(settings: Settings) -> str:
    """Every slot container of the project (running or not) as `<service> <network>,...`:
    which of them are on the edge network (edge.parse_slot_networks). One `docker ps`."""
    filters = [f"label={label}" for label in (
        f"com.docker.compose.project={settings.compose_project}",
        "com.docker.compose.oneoff=False")]
    return " ".join(["docker ps", "--all", *(f"--filter {q(f)}" for f in filters),
                     "--format",
                     q('{{.Label "com.docker.compose.service"}} {{.Networks}}')])


def edge_routes(settings: Settings) -> str:
    """Prints edge.EDGE_EXISTS when the environment's edge network exists (its route is
    Docker's own), else the host's IPv4 routes (`ip -4 route show`; nothing without
    iproute2): what edge.route_conflicts reads before Compose creates the network."""
    return (f"docker network inspect --format '{{{{.Id}}}}' "
            f"{q(edge.network_name(settings.compose_project))} >/dev/null 2>&1 "
            f"&& echo {edge.EDGE_EXISTS} "
            "|| { command -v ip >/dev/null 2>&1 && ip -4 route show; true; }")


def stop_slot(settings: Settings, slot: str) -> str:
    """Stop the slot's running container (Compose's `stop` with its timeout, without the
    ~0.15 s Compose takes to load the project): SIGTERM, then SIGKILL after stop_timeout
    seconds. Nothing running: nothing to do."""
    return (f"ids=$({service_containers(settings, service(slot), running=True)}); "
            f'[ -z "$ids" ] || docker stop --time {int(settings.deployment["stop_timeout"])} '
            "$ids > /dev/null")


def slot_container_ids(settings: Settings, slot: str) -> str:
    return service_containers(settings, service(slot))


def slot_logs(settings: Settings, slot: str, lines: int = 15) -> str:
    return compose(settings, "logs", "--no-color", "--tail", str(lines), service(slot))


def container_state(container: str) -> str:
    """`running 0 0`: status, exit code, restart count (see parse_container_state)."""
    return ("docker inspect --format '{{.State.Status}} {{.State.ExitCode}} "
            "{{.RestartCount}}' " + q(container))


# The proxy's CPU cgroup parent on this host (compose.yml's PROXY_CGROUP_PARENT): a top-level
# group of its own, `/togather` (Docker's cgroupfs driver) or `togather.slice` (systemd's),
# instead of Docker's group that every container shares. Under CFS group scheduling the
# containers of that group share one weight against everything else on the host: the proxy
# and the app it forwards to split what one group gets. On the 2-core test bed that cost the
# HTTPS path 15-20 % of its throughput (README, "Sustained throughput"); in production it
# keeps the front door's CPU apart from a busy app's. Empty (Docker's default) for a rootless
# daemon, which cannot place containers elsewhere.
PROXY_CGROUP_PROBE = (
    "docker info --format '{{$r := false}}{{range .SecurityOptions}}"
    '{{if eq . "name=rootless"}}{{$r = true}}{{end}}{{end}}'
    '{{if $r}}{{else if eq .CgroupDriver "systemd"}}togather.slice{{else}}/togather{{end}}\'')


def start_proxy(settings: Settings, *, recreate: bool = False) -> str:
    return (f'PROXY_CGROUP_PARENT="$({PROXY_CGROUP_PROBE})" '
            + compose(settings, "up", "--detach", "--no-deps",
                      *(["--force-recreate"] if recreate else []), "proxy"))


def reload_proxy(settings: Settings) -> str:
    """Test the configuration first: a bad one never reaches the running proxy (nginx: a
    graceful reload; HAProxy: a seamless one, togather-haproxy)."""
    reload = engine_of(settings).reload
    return (f"id=$({service_containers(settings, 'proxy', running=True)} | head -n 1); "
            '[ -n "$id" ] || { echo "the proxy container is not running" >&2; exit 1; }; '
            'docker exec "$id" sh -c ' + q(reload))


def running_proxy(settings: Settings) -> str:
    """The running proxy's image, network mode, worker setting, CPU cgroup parent and the one
    this host wants (`IMAGE MODE workers=W cgroup=PARENT own=WANTED`), empty when none runs:
    one round trip."""
    return (f"id=$({service_containers(settings, 'proxy', running=True)}"
            ' | head -n 1); [ -z "$id" ] || { docker inspect --format '
            + q("{{.Config.Image}} {{.HostConfig.NetworkMode}} workers="
                "{{range .Config.Env}}{{if eq (index (split . \"=\") 0) "
                "\"TOGATHER_NGINX_WORKERS\"}}{{index (split . \"=\") 1}}{{end}}{{end}}"
                " cgroup={{.HostConfig.CgroupParent}}")
            + f' "$id" | tr -d \'\\n\'; printf \' own=%s\\n\' "$({PROXY_CGROUP_PROBE})"; }}')


def read_routes(layout: Layout) -> str:
    """The state files as nginx tests them (a regular file `green`, `blue`; anything named
    `maintenance`), one name per line, and after a `--` line the pre-marker upstream file
    when there is one: what the proxy routes to, in one round trip."""
    state = q(layout.proxy_state_dir)
    return (f"for n in green blue; do [ -f {state}/$n ] && echo $n; done; "
            f"[ -e {state}/maintenance ] && echo maintenance; echo --; "
            f"cat {q(layout.upstream_file)} 2>/dev/null; true")


def maintenance_on(layout: Layout, page_dir: str) -> str:
    """Link state/maintenance to pages/<page_dir> in one rename (the link is relative: the
    proxy sees the same tree under another path), then drop the other page directories."""
    temporary = f"{layout.proxy_state_dir}/.maintenance.new"
    return (f"ln -sfn {q('pages/' + page_dir)} {q(temporary)}"
            f" && mv -fT {q(temporary)} {q(layout.maintenance_link)}"
            f" && find {q(layout.maintenance_pages)} -mindepth 1 -maxdepth 1"
            f" ! -name {q(page_dir)} -exec rm -rf {{}} +")


def maintenance_off(layout: Layout) -> str:
    """Unlink state/maintenance (traffic flows from the next request), then the pages."""
    return (f"rm -f {q(layout.maintenance_link)}"
            f" && {{ find {q(layout.maintenance_pages)} -mindepth 1 -maxdepth 1"
            " -exec rm -rf {} + 2>/dev/null || true; }")


def proxy_files(settings: Settings) -> str:
    """What the switch needs to know of the proxy's files, in one round trip: the slots'
    containers and their networks (`<service> <net>,<net>`, edge.parse_slot_networks), `--`,
    the digest of the site nginx last loaded (one line), the verification map, `--`, the
    site.conf."""
    layout = Layout(settings.remote_dir)
    return (f"{slot_networks(settings)}; echo --; "
            f'printf \'%s\\n\' "$(cat {q(layout.site_loaded)} 2>/dev/null)"; '
            f"cat {q(layout.verify_map)} 2>/dev/null; echo --; "
            f"cat {q(layout.site_file)} 2>/dev/null; true")


def mark_slot(layout: Layout, slot: str) -> str:
    """Route to `slot`: rename the other slot's marker onto it (rename(2): at every instant
    exactly one marker exists), or create it when there is none (first deploy)."""
    other = "green" if slot == "blue" else "blue"
    target = layout.slot_marker(slot)
    source = q(layout.slot_marker(other))
    return (f"{{ mv -fT {source} {q(target)} 2>/dev/null || [ ! -e {source} ]; }}"
            f" && {{ [ -e {q(target)} ] || : > {q(target)}; }}")


def unmark_slots(layout: Layout) -> str:
    """No slot marked (a first deploy undone): nginx then defaults to blue, which runs
    nothing."""
    return remove_files(layout.slot_marker("blue"), layout.slot_marker("green"))


def image_exists(image: str) -> str:
    return f"docker image inspect {q(image)} > /dev/null 2>&1"


def build_proxy_image(image: str, directory: str) -> str:
    return f"docker build --quiet -t {q(image)} {q(directory)}"


def image_tags(image: str) -> str:
    """One tag of the repository `image` per line, newest first."""
    return f"docker image ls --format '{{{{.Tag}}}}' {q(image)}"


def remove_image(ref: str) -> str:
    return f"docker image rm {q(ref)}"


def make_dirs(*paths: str) -> str:
    return "mkdir -p " + " ".join(q(p) for p in paths)


def read_file(path: str) -> str:
    """The file's content; empty (and success) when it does not exist."""
    return f"cat {q(path)} 2>/dev/null || true"


def list_dir(path: str) -> str:
    """One name per line; empty (and success) when the directory does not exist."""
    return f"ls -1 {q(path)} 2>/dev/null || true"


def remove_files(*paths: str) -> str:
    return "rm -f " + " ".join(q(p) for p in paths)


def remove_trees(*paths: str) -> str:
    return "rm -rf " + " ".join(q(p) for p in paths)


def slots_env(settings: Settings, images: dict[str, str]) -> str:
    """The non-secret values compose.yml interpolates. The images come from the state file
    (a rollback's target) or from slots.env itself, both on the host: one holding a line break
    or a quote would add its own lines to this file, so it is refused."""
    for slot, image in images.items():
        if not IMAGE_REF_RE.fullmatch(image):
            raise StateError(f"refusing to write the {slot} image {image[:80]!r} into slots.env: "
                             "not a Docker image reference",
                             hint="Check the deployment's `image` in the state file and "
                                  "slots.env on the host.")
    lines = {
        "COMPOSE_PROJECT_NAME": settings.compose_project,
        "APP_PORT": str(settings.app_port),
        "BLUE_IMAGE": images.get("blue", f"{settings.image}:none"),
        "GREEN_IMAGE": images.get("green", f"{settings.image}:none"),
        "BLUE_PORT": str(settings.ports["blue"]),
        "GREEN_PORT": str(settings.ports["green"]),
        "EDGE_SUBNET": str(settings.edge_subnet),
        "BLUE_EDGE_ADDRESS": settings.edge_address("blue"),
        "GREEN_EDGE_ADDRESS": settings.edge_address("green"),
        "PROXY_IMAGE": proxy_image_ref(proxy_engine(settings)),
        "PROXY_WORKERS": proxy_workers(settings),
        "STOP_GRACE_PERIOD": f"{settings.deployment['stop_timeout']}s",
        "LOG_MAX_SIZE": settings.deployment["log_rotation"]["max_size"],
        "LOG_MAX_FILE": str(settings.deployment["log_rotation"]["max_files"]),
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def logs_command(settings: Settings, service_name: str, *, lines: int,
                 since_seconds: int | None = None, follow: bool = False) -> str:
    """One service's container logs, without compose's `name |` prefix (one service per call;
    the caller prefixes hosts). A followed log ends when its caller goes away
    (until_input_closes)."""
    args = ["logs", "--no-color", "--no-log-prefix", "--tail", str(lines)]
    if since_seconds is not None:
        args += ["--since", f"{since_seconds}s"]
    if follow:
        args.append("--follow")
    line = compose(settings, *args, q(service_name))
    return until_input_closes(line) if follow else line


def until_input_closes(command: str) -> str:
    """Run `command` until it ends or this shell's standard input closes, whichever is first.
    Closing an SSH channel without a terminal sends the remote side no signal: a followed log
    of a quiet app would outlive the operator's Ctrl-C. A background job's standard input is
    /dev/null unless redirected, hence the copy on descriptor 3."""
    return (f"exec 3<&0; {command} & pid=$!; "
            '{ cat <&3 > /dev/null; kill "$pid"; } > /dev/null 2>&1 & '
            'wait "$pid"')


def exec_command(settings: Settings, slot: str, command: str, *, one_off: bool,
                 interactive: bool) -> str:
    """The operator's command under `sh -c` in the slot's service: a one-off container of its
    image with its environment (`run --rm --no-deps`: no published port, nothing else
    started), or inside the running container (`exec`). Without a terminal (-T) it ends when
    its caller goes away (until_input_closes) and its own standard input is empty."""
    verb = ["run", "--rm", "--no-deps"] if one_off else ["exec"]
    tty = [] if interactive else ["-T"]
    compose_for = _compose_one_off if one_off else _compose_without_slots
    line = compose_for(settings, "--env-file", q(Layout(settings.remote_dir).slots_env), *verb,
                       *tty, service(slot), "sh", "-c", q(command))
    return line if interactive else until_input_closes(line)


def audit_tail_command(directory: str, lines: int) -> str:
    """The last `lines` lines of the host's audit log; nothing when there is none yet."""
    path = q(f"{directory}/audit.log")
    return f"if [ -e {path} ]; then tail -n {int(lines)} {path}; fi"


def parse_env_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def dotenv_quote(value: str) -> str:
    """A value for Compose's env_file. Single quotes keep a value literal, but Compose's parser
    still treats a backslash before the closing quote as an escape; so a value holding a quote,
    a backslash or a line break is written double-quoted with escapes (and `$$` for `$`, which
    Compose would otherwise interpolate inside double quotes)."""
    if not any(c in value for c in "'\\\n\r"):
        return f"'{value}'"
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("$", "$$"))
    return f'"{escaped}"'


def app_env_file(variables: dict[str, str]) -> str:
    return "".join(f"{k}={dotenv_quote(v)}\n" for k, v in sorted(variables.items()))


def pgpass_line(url: str) -> str:
    """A .pgpass line (host:port:db:user:password), with `:` and `\\` escaped."""
    parts = database_parts(url)

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return ":".join(esc(parts[k]) for k in ("host", "port", "dbname", "user", "password")) + "\n"


def connection_settings(url: str) -> dict[str, str]:
    """The libpq variables for the URL's query settings (TLS above all), `sslmode` always
    present; keys libpq has no variable for, and secrets, are left out."""
    query = dict(parse_qsl(database_parts(url)["query"]))
    found = {"PGSSLMODE": DEFAULT_SSLMODE, "PGCONNECT_TIMEOUT": "10"}
    found.update({env: query[key] for key, env in LIBPQ_QUERY_ENV.items() if key in query})
    return found


def pg_env(settings: Settings, passfile: str | None = None) -> str:
    """Connection environment for libpq tools: everything but the password, which is in the
    PGPASSFILE. Safe to show in a process list. `passfile` is a shell expression used as is
    (e.g. `"$f"` for a temporary file); by default the environment's .pgpass. The URL's TLS
    settings come along: dropping them would let libpq fall back to a plain connection."""
    parts = database_parts(settings.migrate_database_url)
    layout = Layout(settings.remote_dir)
    return " ".join([
        f"PGPASSFILE={passfile or q(layout.pgpass)}", f"PGHOST={q(parts['host'])}",
        f"PGPORT={q(parts['port'])}", f"PGUSER={q(parts['user'])}",
        f"PGDATABASE={q(parts['dbname'])}",
        *(f"{k}={q(v)}" for k, v in connection_settings(settings.migrate_database_url).items())])


def passwordless_url(settings: Settings) -> str:
    """The migration URL without its password (the tool's driver, lib/pq, reads PGPASSFILE);
    a password given as a query parameter is dropped too. Without an `sslmode` it gets
    libpq's default, so the migration tool connects the way pg_dump does."""
    parts = database_parts(settings.migrate_database_url)
    params = [p for p in parts["query"].split("&")
              if p and p.split("=", 1)[0].lower() not in SECRET_QUERY_KEYS]
    if not any(p.split("=", 1)[0] == "sslmode" for p in params):
        params.append(f"sslmode={DEFAULT_SSLMODE}")
    host = f"[{parts['host']}]" if ":" in parts["host"] else parts["host"]
    return (f"postgres://{quote(parts['user'], safe='')}@{host}:{parts['port']}/"
            f"{quote(parts['dbname'], safe='')}?{'&'.join(params)}")


# snapshot_command's exit status when a snapshot of that name exists already (two taken in
# one second: a restore's safety snapshot right after `inv db.snapshot`).
SNAPSHOT_NAME_TAKEN = 17


def snapshot_command(settings: Settings, path: str) -> str:
    """pg_dump into a partial file, check the archive's table of contents, then link it under
    its final name, never over an existing snapshot (`ln` refuses: exit SNAPSHOT_NAME_TAKEN):
    a snapshot that exists under its final name is complete, readable, and the one taken
    under that name."""
    partial = f"{path}.partial"
    directory = path.rsplit("/", 1)[0]
    return (
        f"umask 077 && mkdir -p {q(directory)} && "
        f"{pg_env(settings)} pg_dump --no-password --format=custom --compress=6 --no-owner "
        f"--file={q(partial)} && "
        f"test -s {q(partial)} && pg_restore --list {q(partial)} > /dev/null && "
        f"{{ ln {q(partial)} {q(path)} 2>/dev/null || {{ rm -f {q(partial)}; "
        f"exit {SNAPSHOT_NAME_TAKEN}; }}; }} && rm -f {q(partial)} && stat -c %s {q(path)}"
    )


# Before the snapshot is replayed, in the same transaction: drop every schema the restoring
# role owns (CASCADE), so tables, types and functions created after the snapshot (by a later
# migration) go as well; `pg_restore --clean` would drop only the objects the dump contains.
# `public` is recreated with its owner, comment and privileges (PostgreSQL 15 gives it to
# pg_database_owner, and pg_dump does not dump it). Schemas of other roles are left alone.
RESET_SCHEMAS_SQL = """SET client_min_messages = warning;
DO $togather$
DECLARE
    s record;
    a record;
BEGIN
    FOR s IN SELECT nspname, nspowner::regrole AS owner, nspacl,
                    obj_description(oid, 'pg_namespace') AS note
             FROM pg_namespace
             WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'
               AND pg_has_role(nspowner, 'USAGE')
    LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
        CONTINUE WHEN s.nspname <> 'public';
        EXECUTE format('CREATE SCHEMA public AUTHORIZATION %s', s.owner);
        EXECUTE format('COMMENT ON SCHEMA public IS %L', s.note);
        FOR a IN SELECT grantee, privilege_type FROM aclexplode(s.nspacl) LOOP
            EXECUTE format('GRANT %s ON SCHEMA public TO %s', a.privilege_type,
                           CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                ELSE a.grantee::regrole::text END);
        END LOOP;
    END LOOP;
END
$togather$;"""


def restore_command(settings: Settings, path: str, dbname: str | None = None) -> str:
    """Make the environment's database (or `dbname`) exactly the snapshot, in one transaction:
    BEGIN, drop the role's schemas (RESET_SCHEMAS_SQL), replay the snapshot as SQL
    (`pg_restore --file=-`), and send COMMIT only when pg_restore has read the whole archive.
    A truncated or unreadable snapshot, or any SQL error, ends psql without a COMMIT, so
    PostgreSQL rolls everything back; pipefail turns either failure into a non-zero exit."""
    target = dbname or database_parts(settings.migrate_database_url)["dbname"]
    script = (f"{{ printf '%s\\n' 'BEGIN;' {q(RESET_SCHEMAS_SQL)} && "
              f"pg_restore --no-owner --exit-on-error --file=- {q(path)} && "
              "printf '%s\\n' 'COMMIT;'; } | "
              f"{pg_env(settings)} psql --no-password -X -q -v ON_ERROR_STOP=1 "
              f"--dbname={q(target)} > /dev/null")
    return f"bash -o pipefail -c {q(script)}"


def migrate_command(settings: Settings, migrations_dir: str, image: str | None = None) -> str:
    """`image`: the new release's image, where `command` runs (the host tools ignore it)."""
    tool = settings.database["migration_tool"]
    timeout = int(settings.database["migration_timeout"])
    guard = f"timeout --kill-after=10 {timeout}"
    if tool == "command" and image:
        return migrate_in_image_command(settings, image, guard)
    if tool == "dbmate":
        return (f"{pg_env(settings)} {guard} dbmate --url {q(passwordless_url(settings))} "
                f"--migrations-dir {q(migrations_dir)} --no-dump-schema --wait "
                f"--wait-timeout 10s up")
    if tool == "golang-migrate":
        return (f"{pg_env(settings)} {guard} migrate -path {q(migrations_dir)} "
                f"-database {q(passwordless_url(settings))} up")
    if tool == "custom":
        # The operator's own command; it finds the database through the PG* variables.
        return (f"cd {q(migrations_dir)} && {pg_env(settings)} {guard} sh -c "
                f"{q(settings.database['migration_command'])}")
    raise ValueError(f"no migration command for tool {tool!r}")


def migrate_in_image_command(settings: Settings, image: str, guard: str) -> str:
    """The app's own migration command in a one-off container of the new image, through
    Compose so that it gets exactly what a slot gets (app.env parsed the Compose way, the
    host.docker.internal alias, the project's network) and the host needs no migration tool.
    The slot's image comes from the environment, which Compose prefers to any env file (and
    slots.env does not exist before a first deploy's start step); the ports are not published
    by `run`, so a running slot is undisturbed. Its standard input is /dev/null: `run`
    attaches it otherwise, and over SSH that ended the session."""
    return (f"BLUE_IMAGE={q(image)} {guard} "
            + _compose_one_off(settings, "run", "--rm", "--no-deps", "-T",
                                     service("blue"), "sh", "-c",
                                     q(settings.database["migration_command"]))
            + " < /dev/null")


def dbmate_status_command(settings: Settings, migrations_dir: str) -> str:
    """dbmate's own list of applied (`[X] name`) and pending (`[ ] name`) migrations: read-only
    (it creates nothing, not even its table), and by the tool's own naming rules."""
    return (f"{pg_env(settings)} timeout --kill-after=10 60 dbmate "
            f"--url {q(passwordless_url(settings))} --migrations-dir {q(migrations_dir)} "
            f"--wait --wait-timeout 10s status")


def parse_dbmate_status(output: str) -> list[str]:
    return [line[4:].strip() for line in output.splitlines() if line.startswith("[ ] ")]


def golang_migrate_pending(files: list[str], current: int | None) -> list[str]:
    """The `.up.` files golang-migrate would apply: those above the database's version
    (`current`, None when schema_migrations is empty or absent)."""
    pending = []
    for name in files:
        match = re.match(r"^(\d+)_.*\.up\.[^/]+$", name)
        if match and (current is None or int(match[1]) > current):
            pending.append(name)
    return sorted(pending, key=lambda n: int(n.split("_", 1)[0]))


def tool_error(stdout: str, stderr: str, exit_status: int) -> str:
    """Why a tool failed, in its own words: the last lines of stderr (where the SQL error is),
    else the last line of stdout, else the exit status."""
    errors = [line.strip() for line in stderr.splitlines() if line.strip()]
    outputs = [line.strip() for line in stdout.splitlines() if line.strip()]
    cause = " / ".join(errors[-3:]) if errors else (outputs[-1] if outputs else "")
    return re.sub(r"^error:\s*", "", cause, flags=re.IGNORECASE) or f"exit {exit_status}"


def bounded(text: str, redact: Callable[[str], str], limit: int = 400) -> str:
    """Redacted first, then cut: a cut never leaves part of a secret behind."""
    text = redact(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def migration_failure(stdout: str, stderr: str, exit_status: int,
                      redact: Callable[[str], str]) -> str:
    """What a failed migration says: the migration being applied (dbmate prints
    `Applying: NAME`) and the tool's error, redacted and bounded."""
    applying = [line.split(":", 1)[1].strip() for line in stdout.splitlines()
                if line.startswith("Applying:")]
    what = f"migration {applying[-1]} failed" if applying else "migration failed"
    return bounded(f"{what}: {tool_error(stdout, stderr, exit_status)}", redact)


def migration_tool_binary(tool: str) -> str | None:
    return {"dbmate": "dbmate", "golang-migrate": "migrate"}.get(tool)


def count_applied(tool: str, output: str) -> int:
    if tool == "dbmate":
        return sum(1 for line in output.splitlines() if line.startswith("Applying: "))
    if tool == "golang-migrate":
        return sum(1 for line in output.splitlines() if re.match(r"^\d+/u ", line.strip()))
    return 0


def dirty_check_command(settings: Settings) -> str:
    """golang-migrate's schema_migrations(version, dirty): prints `version|t` or `version|f`,
    nothing when the table does not exist yet; fails when the database cannot be reached.

    Read-only and run before anything else, also in a dry run, so it leaves nothing behind:
    the password comes on standard input into a private temporary file that is removed on
    exit (never on a command line)."""
    env = pg_env(settings, passfile='"$f"')
    psql = f"{env} psql --no-password -X -A -t -v ON_ERROR_STOP=1 -c"
    exists = q("SELECT to_regclass('schema_migrations') IS NOT NULL")
    select = q("SELECT version, dirty FROM schema_migrations LIMIT 1")
    return ("f=$(mktemp) && trap 'rm -f \"$f\"' EXIT && cat > \"$f\" && "
            f"exists=$({psql} {exists}) && "
            f"if [ \"$exists\" = t ]; then {psql} {select}; fi")


def read_if_exists_command(path: str) -> str:
    """The file's content; nothing (and success) when there is none yet."""
    return f"if [ -e {q(path)} ]; then cat -- {q(path)}; fi"
