"""HTTPS certificates on the hosts: the ACME client's image and files, obtaining a certificate
(once, synchronously, so a refusal is reported clearly), the `acme` Compose service that
renews it before expiry, a certificate the operator provides, and what each host serves.

Nothing here ever replaces a working certificate with a broken one: togather-acme installs a
certificate only after lego got it, by rename. A refused order leaves the old certificate (and
the old version: the switch has not happened) serving.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from . import commands as cmd
from . import proxy, tls
from .config import Settings
from .errors import TogatherError
from .hosts import Host

if TYPE_CHECKING:
    from .session import Session

q = shlex.quote
ACME_IMAGE_FILES = ("Dockerfile", "togather-acme")
ACME_SERVICE = "acme"
OBTAIN_TIMEOUT = 300
# lego's errors name the ACME problem type and the domain: those lines are what to show.
_ACME_PROBLEM = re.compile(r"urn:ietf:params:acme:error:(\S+) :: (.*)$")
_LEGO_ERROR = re.compile(r"error: (.*)$", re.IGNORECASE)
_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[\w+\] )?")


@dataclass(frozen=True)
class Paths:
    """Where HTTPS lives under an environment's remote directory. nginx/ is what the proxy
    mounts at /etc/nginx/togather (read-only)."""

    root: str

    @property
    def tls_dir(self) -> str:
        return f"{self.root}/nginx/tls"

    @property
    def webroot(self) -> str:
        return f"{self.root}/nginx/acme"

    @property
    def acme_dir(self) -> str:
        """The ACME account key and lego's data: kept across deploys and proxy recreations."""
        return f"{self.root}/acme"

    @property
    def acme_env(self) -> str:
        return f"{self.acme_dir}/acme.env"

    @property
    def ca_bundle(self) -> str:
        return f"{self.acme_dir}/ca-bundle.pem"

    @property
    def issued_by(self) -> str:
        """Where the installed certificate came from: an ACME directory URL, or `provided`."""
        return f"{self.acme_dir}/issued-by"

    @property
    def image_dir(self) -> str:
        return f"{self.root}/acme-image"

    @property
    def served_chain(self) -> str:
        return f"{self.tls_dir}/{tls.SITE_CRT}"


# --- commands (pure) ------------------------------------------------------------------------


def acme_image_ref() -> str:
    """Tagged by content, like the proxy image: a changed script builds a new image."""
    digest = hashlib.sha256()
    for name in ACME_IMAGE_FILES:
        digest.update((cmd.DOCKER_DIR / "acme" / name).read_bytes())
    return f"togather-acme:{digest.hexdigest()[:12]}"


def acme_compose(settings: Settings, *args: str) -> str:
    """Compose with the acme service's image named through the environment (slots.env, which
    every other command rewrites, knows nothing of it)."""
    return f"ACME_IMAGE={q(acme_image_ref())} " + cmd.compose(settings, *args)


def directories(paths: Paths) -> str:
    """tls/ and acme/ under the mounted nginx directory are read by nginx's workers (the
    challenge files, the certificate by its owner); the ACME data is the deploy user's alone."""
    return (cmd.private_directories(paths.root, paths.tls_dir, paths.webroot, paths.acme_dir,
                                    paths.image_dir)
            + f" && chmod 755 {q(paths.tls_dir)} {q(paths.webroot)}"
            + f" && chmod 700 {q(paths.acme_dir)}")


def obtain_command(settings: Settings) -> str:
    return acme_compose(settings, "run", "--rm", "-T", "--no-deps", ACME_SERVICE, "obtain")


def renew_command(settings: Settings, *, force: bool) -> str:
    return acme_compose(settings, "run", "--rm", "-T", "--no-deps", ACME_SERVICE, "renew",
                        *(["--force"] if force else []))


def install_command(settings: Settings, incoming: str) -> str:
    return acme_compose(settings, "run", "--rm", "-T", "--no-deps", "--volume",
                        q(f"{incoming}:/incoming:ro"), ACME_SERVICE, "install")


def start_renewer(settings: Settings) -> str:
    """The long-running renewal service; Compose recreates it only when it changed."""
    return acme_compose(settings, "up", "--detach", "--no-deps", ACME_SERVICE)


def stop_renewer(settings: Settings) -> str:
    return acme_compose(settings, "rm", "--stop", "--force", ACME_SERVICE)


def acme_failure(output: str) -> str:
    """The lines of lego's output that say why: the ACME problem (with the domain it names),
    else the last line."""
    lines = [_LOG_PREFIX.sub("", line.strip()) for line in output.splitlines() if line.strip()]
    found = [f"{m.group(1)}: {m.group(2)}" for line in lines
             if (m := _ACME_PROBLEM.search(line))]
    found = found or [m.group(1) for line in lines if (m := _LEGO_ERROR.search(line))]
    return "; ".join(dict.fromkeys(found[-3:])) or (lines[-1] if lines else "no output")


# --- on a host ------------------------------------------------------------------------------


def served_certificate(settings: Settings, host: Host) -> tls.CertificateInfo | None:
    """The certificate the host's proxy serves (its public copy), None when there is none."""
    text = host.run(cmd.read_file(Paths(settings.remote_dir).served_chain), timeout=30).stdout
    try:
        return tls.describe(tls.load_chain(text.encode())[0]) if text.strip() else None
    except ValueError:
        return None


def ensure_image(settings: Settings, host: Host) -> None:
    paths = Paths(settings.remote_dir)
    image = acme_image_ref()
    if host.run(cmd.image_exists(image), check=False).ok:
        return
    for name in ACME_IMAGE_FILES:
        host.write_file(f"{paths.image_dir}/{name}",
                        (cmd.DOCKER_DIR / "acme" / name).read_bytes(), mode=0o755)
    host.run(cmd.build_proxy_image(image, paths.image_dir), timeout=settings.build["timeout"],
             what="building the ACME client image")


def prepare(settings: Settings, host: Host) -> None:
    """Directories, the client image and its configuration on the host."""
    settings_tls = _tls(settings)
    paths = Paths(settings.remote_dir)
    host.run(directories(paths), timeout=30, what="creating the HTTPS directories")
    ensure_image(settings, host)
    if settings_tls.acme:
        reuse_key = cmd.engine_of(settings).reads_certificate_per_handshake
        host.write_file(paths.acme_env,
                        tls.acme_env(settings_tls, reuse_key=reuse_key).encode(), mode=0o600)
        if settings_tls.acme.ca_bundle:
            host.write_file(paths.ca_bundle, settings_tls.acme.ca_bundle.read_bytes(),
                            mode=0o644)


def serve_challenges(settings: Settings, host: Host) -> str:
    """The deploy's certificate step, first on every host: the proxy serving this
    configuration's site (its HTTP server answers the ACME challenge, in a fleet its peers'
    too; the slot marker is not touched, the old version keeps serving). Only then does any
    host ask for a certificate (`ensure`): the ACME server's request may reach any host
    through the load balancer, and one still on the old site would answer it 404. The switch
    that follows finds the site in place: no second reload. Returns what the proxy did."""
    site, _ = proxy.write_site(settings, host)
    proxy.take_over(settings, host, proxy.read_routes(settings, host))
    return proxy.apply_config(settings, host, site)


def step_line(proxy_how: str, done: str) -> str:
    """One host's line of the certs step: what the proxy did (when it did something), then
    what happened to the certificate."""
    return done if proxy_how == "unchanged" else f"proxy {proxy_how}; {done}"


def retire_after_switch(session: Session, host: Host) -> None:
    """`retire` as cleanup after a deploy's or a rollback's switch: said when done, a failure
    only a warning (the next deploy or rollback tries again)."""
    try:
        done = retire(session.settings, host)
    except (TogatherError, OSError) as exc:
        session.console.warn(f"{host.name}: could not remove the certificate renewal service "
                             f"({exc}); the next deploy or rollback tries again")
        return
    if done:
        session.console.note(f"{host.name}: {done}")


def load_certificate(settings: Settings, host: Host) -> None:
    """After the tool installed a new certificate: the nginx engine reads it at the next
    handshake; HAProxy (proxy.engine: haproxy) loads it by a seamless reload, which keeps
    every client connection. A proxy not running loads it when it starts."""
    if cmd.engine_of(settings).reads_certificate_per_handshake:
        return
    result = host.run(cmd.reload_proxy(settings), timeout=60, check=False)
    if not result.ok and "not running" not in result.stderr:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TogatherError(f"{host.name}: the proxy did not load the new certificate: "
                            f"{detail}", hint="The previous certificate keeps serving.")


def renewer_running(settings: Settings) -> str:
    """Prints the acme service's container ids (none: no renewer on the host)."""
    return cmd.service_containers(settings, ACME_SERVICE)


def retire(settings: Settings, host: Host) -> str | None:
    """An environment without proxy.tls.acme (HTTPS removed, or a provided certificate):
    the renewal service, left from when it had it, stopped and removed, or it would go on
    renewing (and installing) a certificate nothing asked for. The certificate, the account
    and lego's data stay (HTTPS turned on again reuses them). One `docker ps` where there is
    none. Returns what was done, None for nothing."""
    if settings.tls is not None and settings.tls.acme is not None:
        return None
    if not host.run(renewer_running(settings), timeout=30, check=False).stdout.strip():
        return None
    host.run(stop_renewer(settings), timeout=120, what="removing the certificate renewal "
                                                          "service")
    return "certificate renewal service removed (no proxy.tls.acme)"


def ensure(settings: Settings, host: Host) -> str:
    """The certificate this configuration wants, on the host, and (ACME) its renewal service
    running. Returns what happened, for the operator."""
    settings_tls = _tls(settings)
    paths = Paths(settings.remote_dir)
    prepare(settings, host)
    current = served_certificate(settings, host)
    if settings_tls.acme is None:
        # Renewing an ACME certificate would overwrite the provided one.
        retire(settings, host)
        return upload_provided(settings, host, current)
    issued_by = host.run(cmd.read_file(paths.issued_by), timeout=30).stdout.strip()
    reason = tls.needs_certificate(settings_tls, current, issued_by=issued_by or None)
    if reason:
        obtain(settings, host, reason)
        host.write_file(paths.issued_by, f"{settings_tls.acme.directory}\n".encode(),
                        mode=0o600)
        current = served_certificate(settings, host)
        load_certificate(settings, host)
        how = f"obtained ({reason})"
    else:
        how = "reused"
    host.run(start_renewer(settings), timeout=120, what="starting the certificate renewal")
    return f"certificate {how}: {describe(current)}"


def obtain(settings: Settings, host: Host, reason: str) -> None:
    settings_tls = _tls(settings)
    result = host.run(obtain_command(settings), timeout=OBTAIN_TIMEOUT, check=False)
    if not result.ok:
        raise TogatherError(
            f"{host.name}: the ACME server did not issue a certificate for "
            f"{', '.join(settings_tls.domains)} ({reason}): "
            f"{acme_failure(result.stdout + chr(10) + result.stderr)}",
            hint="Nothing was switched: the old version and its certificate keep serving. "
                 "Check that each domain resolves to this host and that its port "
                 f"{settings.ports['proxy']} is reachable from the ACME server "
                 f"({settings_tls.acme.directory if settings_tls.acme else ''}).")


def upload_provided(settings: Settings, host: Host, current: tls.CertificateInfo | None) -> str:
    """A provided certificate and key, installed by the acme container (it alone may give
    the key to nginx's worker); skipped when the host already serves this certificate."""
    settings_tls = _tls(settings)
    if settings_tls.certificate is None or settings_tls.key is None:
        raise TogatherError("proxy.tls: a provided certificate needs certificate and key")
    chain = settings_tls.certificate.read_bytes()
    wanted = tls.describe(tls.load_chain(chain)[0])
    if current is not None and current.serial == wanted.serial \
            and current.not_after == wanted.not_after:
        return f"provided certificate already installed: {describe(current)}"
    paths = Paths(settings.remote_dir)
    incoming = f"{paths.acme_dir}/incoming"
    host.run(cmd.private_directories(incoming), timeout=30)
    try:
        host.write_file(f"{incoming}/site.crt", chain, mode=0o644)
        host.write_file(f"{incoming}/site.key", settings_tls.key.read_bytes(), mode=0o600)
        result = host.run(install_command(settings, incoming), timeout=120, check=False)
    finally:
        host.run(cmd.remove_trees(incoming), timeout=30, check=False)
    if not result.ok:
        raise TogatherError(f"{host.name}: installing the provided certificate failed: "
                            f"{acme_failure(result.stderr)}")
    host.write_file(paths.issued_by, f"{tls.PROVIDED}\n".encode(), mode=0o600)
    load_certificate(settings, host)
    return f"provided certificate installed: {describe(wanted)}"


def renew(settings: Settings, host: Host, *, force: bool) -> tuple[str, tls.CertificateInfo]:
    """Renew now (`force`: whatever the expiry). Returns `renewed` or `not due` and the
    certificate served afterwards."""
    settings_tls = _tls(settings)
    if settings_tls.acme is None:
        raise TogatherError("proxy.tls uses a provided certificate: renew it yourself, "
                            "update proxy.tls.certificate and key, and deploy")
    prepare(settings, host)
    result = host.run(renew_command(settings, force=force), timeout=OBTAIN_TIMEOUT,
                      check=False)
    if not result.ok:
        raise TogatherError(f"{host.name}: renewal failed: "
                            f"{acme_failure(result.stdout + chr(10) + result.stderr)}",
                            hint="The current certificate keeps serving.")
    current = served_certificate(settings, host)
    if current is None:
        raise TogatherError(f"{host.name}: no certificate installed after the renewal")
    outcome = "renewed" if "renewed" in result.stdout.split() else "not due"
    if outcome == "renewed":
        load_certificate(settings, host)
    return outcome, current


def host_certificate(settings: Settings, host: Host) -> dict[str, object]:
    """certs.show for one host: the installed certificate (its public copy on disk) and what
    the proxy serves over HTTPS (SNI = the first domain)."""
    installed = served_certificate(settings, host)
    served = check_served(settings, host, proxy.address(settings), settings.health_endpoint,
                          timeout=10)
    summary = describe(installed)
    if served.problem:
        summary += f"; {served.problem}"
    elif served.certificate and installed and served.certificate.serial != installed.serial:
        summary += f"; the proxy serves another certificate (serial {served.certificate.serial})"
    else:
        summary += "; served over HTTPS" + (", verified" if served.verified else "")
    return {"installed": installed.as_dict() if installed else None,
            "served": served.as_dict(), "summary": summary}


# A provided certificate is renewed by hand: say so this long before it expires.
PROVIDED_WARN_DAYS = 30


@dataclass(frozen=True)
class HttpsHealth:
    """inv health's HTTPS line for one host, and what is wrong or close to it."""

    line: str
    problem: str
    warning: str
    doc: dict[str, object]


def https_health(settings: Settings, host: Host) -> HttpsHealth:
    """The app's health endpoint over HTTPS through this host's proxy, and the certificate it
    presents: days left, issuer, whether it verifies. A problem: no answer, not 200, expired
    or unverifiable. A warning: within the renewal window (ACME: the renewal service should
    have renewed it by now) or, for a provided one, a month before expiry."""
    settings_tls = _tls(settings)
    served = check_served(settings, host, proxy.address(settings), settings.health_endpoint,
                          timeout=float(settings.health.timeout))
    url = f"https://{settings_tls.server_name}:{settings_tls.https_port}"
    info = served.certificate
    problem, warning = served.problem, ""
    if not problem and served.status != 200:
        problem = f"{url}{settings.health_endpoint} answered HTTP {served.status}"
    if info is not None:
        window = settings_tls.acme.renew_before_days if settings_tls.acme \
            else PROVIDED_WARN_DAYS
        if info.days_left() <= 0:
            problem = problem or f"the certificate expired on {info.not_after:%Y-%m-%d}"
        elif info.days_left() < window:
            warning = (f"the certificate of {url} expires in {info.days_left():.0f} days "
                       f"({info.not_after:%Y-%m-%d})")
    trust = str(settings_tls.verify_ca) if settings_tls.verify_ca else "the system trust store"
    verdict = f"verified against {trust}" if served.verified else "NOT verified"
    line = (f"{url} via {host.name}: "
            + (f"HTTP {served.status}, " if served.status else "")
            + f"certificate {describe(info)}, {verdict}"
            + (f"; {problem}" if problem else ""))
    return HttpsHealth(line, problem, warning, {"url": url, **served.as_dict(),
                                                "trust": trust})


def describe(info: tls.CertificateInfo | None) -> str:
    if info is None:
        return "none"
    return (f"{', '.join(info.domains)}, issued by {info.issuer}, expires "
            f"{info.not_after:%Y-%m-%d} ({info.days_left():.0f} days)")


def _tls(settings: Settings) -> tls.TlsSettings:
    if settings.tls is None:
        raise TogatherError(f"{settings.env} has no proxy.tls in config/deployment.yml: "
                            "nothing to do for HTTPS")
    return settings.tls


# --- checking what is served ----------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What one host's proxy serves over HTTPS."""

    status: int | None
    certificate: tls.CertificateInfo | None
    verified: bool
    problem: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"http_status": self.status, "verified": self.verified,
                "certificate": self.certificate.as_dict() if self.certificate else None,
                "problem": self.problem}


def check_served(settings: Settings, host: Host, address: str, path: str,
                 timeout: float) -> Served:
    """GET path over HTTPS from the proxy's address on the host with SNI = the first domain:
    once verifying (trust store or proxy.tls.verify_ca), else once without, to still report
    the certificate and say why it does not verify."""
    settings_tls = _tls(settings)
    get = host.https_get
    kwargs = {"timeout": timeout, "server_name": settings_tls.server_name}
    try:
        resp = get(address, settings_tls.https_port, path,
                   context=tls.verify_context(settings_tls.verify_ca), **kwargs)
        return Served(resp.status, _info(resp.certificate), True)
    except tls.CertificateVerificationError as exc:
        reason = exc.verify_message or str(exc)
    except (OSError, ConnectionError, TogatherError) as exc:
        return Served(None, None, False, f"no HTTPS answer: {exc}")
    try:
        resp = get(address, settings_tls.https_port, path, context=tls.probe_context(), **kwargs)
    except (OSError, ConnectionError, TogatherError) as exc:
        return Served(None, None, False, f"no HTTPS answer: {exc}")
    return Served(resp.status, _info(resp.certificate), False,
                  f"the certificate does not verify: {reason}")


def _info(der: bytes | None) -> tls.CertificateInfo | None:
    return tls.describe(x509.load_der_x509_certificate(der)) if der else None
