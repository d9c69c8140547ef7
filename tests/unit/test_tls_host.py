"""HTTPS on the host side without a host: the nginx pieces, the ACME client's command lines
and files, lego's errors, and TLS over a plain connection (hosts.https_get) against a real
local TLS server."""

from __future__ import annotations

import dataclasses
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from togather_tasks import certs, proxy, tls
from togather_tasks.config import Settings
from togather_tasks.deploy import Deploy
from togather_tasks.hosts import HttpResponse, LocalHost

from .fakehost import FakeHost, answer
from .projects import Project
from .test_tls_config import ACME, make_cert, with_tls


def tls_settings(**changes: object) -> tls.TlsSettings:
    base = tls.TlsSettings(("app.example.com", "www.example.com"), 443, True, None,
                           tls.AcmeSettings("ops@example.com", tls.LETS_ENCRYPT, None, 30),
                           None, None)
    return dataclasses.replace(base, **changes)


# --- nginx ----------------------------------------------------------------------------------


def test_https_server_block_loads_the_certificate_per_handshake() -> None:
    block = tls.https_server_block(tls_settings(https_port=9443), "127.0.0.1:9443")
    assert "listen 127.0.0.1:9443 ssl http2;" in block
    # A variable in the path: nginx reads the file at each handshake (no reload on renewal).
    assert "map $ssl_server_name $togather_tls_file {\n" \
           "    default /etc/nginx/togather/tls/site.pem;\n}" in block
    assert "ssl_certificate $togather_tls_file;" in block
    assert "ssl_certificate_key $togather_tls_file;" in block
    assert "ssl_session_cache shared:togather_tls:10m;" in block
    assert "ssl_session_tickets on;" in block
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in block
    assert "include /etc/nginx/togather-app.conf;" in block
    assert "togather_hsts" not in block


def test_hsts_only_when_configured() -> None:
    block = tls.https_server_block(tls_settings(hsts=31536000), "0.0.0.0:443")
    # Set after the include, whose location adds the header from it.
    assert block.endswith("    include /etc/nginx/togather-app.conf;\n"
                          '    set $togather_hsts "max-age=31536000";\n}\n')


def test_http_without_tls_serves_the_app() -> None:
    assert tls.http_locations(None) == "    include /etc/nginx/togather-app.conf;\n"


def test_http_redirects_except_the_challenge() -> None:
    text = tls.http_locations(tls_settings(https_port=9443))
    assert text == (
        "    location ^~ /.well-known/acme-challenge/ {\n"
        "        root /etc/nginx/togather/acme;\n"
        "        default_type text/plain;\n"
        "        try_files $uri =404;\n"
        "    }\n"
        "    location / {\n"
        "        return 301 https://$host:9443$request_uri;\n"
        "    }\n")


def test_redirect_to_the_default_port_names_no_port() -> None:
    assert "return 301 https://$host$request_uri;" in tls.http_locations(tls_settings())


def test_without_redirect_http_serves_the_app_and_the_challenge() -> None:
    text = tls.http_locations(tls_settings(redirect=False))
    assert "location ^~ /.well-known/acme-challenge/" in text
    assert "return 301" not in text
    assert text.endswith("    include /etc/nginx/togather-app.conf;\n")


# --- the ACME client ------------------------------------------------------------------------


def test_acme_env() -> None:
    assert tls.acme_env(tls_settings(), reuse_key=False) == (
        "ACME_DOMAINS=app.example.com,www.example.com\n"
        "ACME_EMAIL=ops@example.com\n"
        "ACME_DIRECTORY=https://acme-v02.api.letsencrypt.org/directory\n"
        "ACME_RENEW_DAYS=30\n"
        "ACME_CA_BUNDLE=\n"
        "ACME_REUSE_KEY=0\n")
    assert tls.acme_env(tls_settings(), reuse_key=True).endswith("ACME_REUSE_KEY=1\n")


@pytest.mark.parametrize(("engine", "reuse"), [("nginx", "1"), ("haproxy", "0")])
def test_renewals_keep_the_key_with_nginx_only(project: Project, engine: str,
                                               reuse: str) -> None:
    """nginx opens the certificate and the key separately at each handshake: a renewal with a
    new key, renamed in between, would fail that handshake. HAProxy reads the file at once."""
    project.write_config(with_tls(ACME).replace("engine: nginx", f"engine: {engine}"))
    settings = project.load("staging")
    host = FakeHost()
    certs.prepare(settings, host)
    env = host.files[certs.Paths(settings.remote_dir).acme_env].decode()
    assert f"ACME_REUSE_KEY={reuse}\n" in env


def test_acme_env_with_a_private_ca(tmp_path: Path) -> None:
    acme = tls.AcmeSettings("ops@example.com", "https://127.0.0.1:14000/dir",
                            tmp_path / "ca.pem", 20)
    text = tls.acme_env(tls_settings(acme=acme), reuse_key=False)
    assert "ACME_CA_BUNDLE=/acme/ca-bundle.pem\n" in text
    assert "ACME_RENEW_DAYS=20\n" in text


def test_paths() -> None:
    paths = certs.Paths("/srv/togather/staging")
    assert paths.tls_dir == "/srv/togather/staging/nginx/tls"
    assert paths.webroot == "/srv/togather/staging/nginx/acme"
    assert paths.acme_dir == "/srv/togather/staging/acme"
    assert paths.served_chain == "/srv/togather/staging/nginx/tls/site.crt"


def test_directories_keep_the_acme_data_private() -> None:
    command = certs.directories(certs.Paths("/srv/t"))
    assert command == (
        "umask 027 && mkdir -p /srv/t /srv/t/nginx/tls /srv/t/nginx/acme /srv/t/acme "
        "/srv/t/acme-image && chmod o-rwx /srv/t"
        " && chmod 755 /srv/t/nginx/tls /srv/t/nginx/acme && chmod 700 /srv/t/acme")


def test_acme_commands(project: Project) -> None:
    project.write_config(with_tls(ACME))
    settings = project.load("staging")
    image = certs.acme_image_ref()
    assert image.startswith("togather-acme:") and len(image) == len("togather-acme:") + 12
    compose = ("docker compose --project-name togather-test-staging --project-directory "
               "/srv/togather/staging --file /srv/togather/staging/compose.yml --env-file "
               "/srv/togather/staging/slots.env")
    assert certs.obtain_command(settings) == \
        f"ACME_IMAGE={image} {compose} run --rm -T --no-deps acme obtain"
    assert certs.renew_command(settings, force=True) == \
        f"ACME_IMAGE={image} {compose} run --rm -T --no-deps acme renew --force"
    assert certs.renew_command(settings, force=False).endswith("acme renew")
    assert certs.start_renewer(settings) == \
        f"ACME_IMAGE={image} {compose} up --detach --no-deps acme"
    assert certs.install_command(settings, "/srv/x y/in").endswith(
        "run --rm -T --no-deps --volume '/srv/x y/in:/incoming:ro' acme install")


def test_acme_failure_names_the_problem_and_the_domain() -> None:
    output = ("2026/12/06 07:07:01 [INFO] [nx.togather.test] acme: Obtaining bundled SAN "
              "certificate\n"
              "2026/12/06 07:07:01 Could not obtain certificates:\n"
              "\terror: one or more domains had a problem:\n"
              "[nx.togather.test] acme: error: 400 :: urn:ietf:params:acme:error:dns :: "
              "NXDOMAIN looking up A for nx.togather.test\n")
    assert certs.acme_failure(output) == "dns: NXDOMAIN looking up A for nx.togather.test"


def test_acme_failure_from_lego_itself() -> None:
    output = ('2026/12/06 07:07:01 Could not create client: get directory at '
              '\'https://127.0.0.1:14000/nope\': 404 page not found\n'
              "error: something else\n")
    assert certs.acme_failure(output) == "something else"


def test_acme_failure_without_a_problem_line() -> None:
    assert certs.acme_failure("starting\nconnection refused\n") == "connection refused"
    assert certs.acme_failure("") == "no output"


# --- TLS over a plain connection --------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Seen-Host", self.headers.get("Host", ""))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    crt, key = make_cert(tmp_path, ["app.example.com"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], crt
    finally:
        server.shutdown()
        server.server_close()


def test_https_get_without_verification(https_server: tuple[int, Path]) -> None:
    port, _ = https_server
    resp = LocalHost().https_get("127.0.0.1", port, "/health", timeout=5,
                                 server_name="app.example.com", context=tls.probe_context())
    assert resp.status == 200
    assert resp.json() == {"ok": True}
    assert resp.headers["x-seen-host"] == f"app.example.com:{port}"
    info = tls.describe(x509.load_der_x509_certificate(resp.certificate))
    assert info.domains == ("app.example.com",)


def test_https_get_verifies_against_a_ca_file(https_server: tuple[int, Path]) -> None:
    port, crt = https_server
    resp = LocalHost().https_get("127.0.0.1", port, "/", timeout=5,
                                 server_name="app.example.com",
                                 context=tls.verify_context(crt))
    assert resp.status == 200


def test_https_get_refuses_an_unknown_issuer(https_server: tuple[int, Path]) -> None:
    port, _ = https_server
    with pytest.raises(ssl.SSLCertVerificationError):
        LocalHost().https_get("127.0.0.1", port, "/", timeout=5,
                              server_name="app.example.com", context=tls.verify_context(None))


def test_https_get_refuses_another_name(https_server: tuple[int, Path]) -> None:
    port, crt = https_server
    with pytest.raises(ssl.SSLCertVerificationError, match="app.example.com|match"):
        LocalHost().https_get("127.0.0.1", port, "/", timeout=5,
                              server_name="other.example.com",
                              context=tls.verify_context(crt))


def test_https_get_to_a_plain_http_port_fails_cleanly() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(OSError):
            LocalHost().https_get("127.0.0.1", server.server_address[1], "/", timeout=5,
                                  server_name="app.example.com",
                                  context=tls.probe_context())
    finally:
        server.shutdown()
        server.server_close()


# --- the proxy's site and checks with HTTPS (proxy.py) ---------------------------------------


def with_https(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, tls=tls_settings(https_port=9443, **changes),
                               ports={**settings.ports, "https": 9443})


def test_site_conf_with_https(settings: Settings) -> None:
    text = proxy.site_conf(with_https(settings))
    http_server, https_server = proxy.server_blocks(with_https(settings))
    assert http_server == ("server {\n"
                           "    listen 0.0.0.0:9080 default_server;\n"
                           "    client_max_body_size 100m;\n"
                           "    proxy_read_timeout 60s;\n"
                           + tls.http_locations(with_https(settings).tls) + "}\n")
    assert "    listen 0.0.0.0:9443 ssl http2;\n" in https_server
    assert text.endswith(https_server)


def test_https_listens_on_ipv6_too(settings: Settings) -> None:
    settings = dataclasses.replace(with_https(settings),
                                   proxy={**settings.proxy, "bind": "::"})
    assert "    listen [::]:9443 ssl http2;\n" in proxy.server_blocks(settings)[1]


class _HttpsHost(FakeHost):
    """A FakeHost whose proxy answers over HTTPS only (HTTP redirects)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, int, str]] = []

    def https_get(self, address: str, port: int, path: str, *, timeout: float,
                  server_name: str, context: ssl.SSLContext,
                  headers: dict[str, str] | None = None) -> HttpResponse:
        self.asked.append((address, port, server_name))
        assert context.verify_mode == ssl.CERT_NONE
        return answer(200, slot="green", body=b'{"version": "abc1234"}')

    def http_get(self, *args: object, **kwargs: object) -> HttpResponse:
        return answer(301)


def test_verify_goes_over_https_when_http_redirects(settings: Settings) -> None:
    host = _HttpsHost()
    assert proxy.verify(with_https(settings), host, "green", "abc1234") is None
    assert host.asked == [("127.0.0.1", 9443, "app.example.com")]


def test_verify_stays_on_http_without_the_redirect(settings: Settings) -> None:
    host = _HttpsHost()
    seen = proxy.verify(dataclasses.replace(with_https(settings, redirect=False),
                                            proxy={**settings.proxy, "verify_attempts": 1}),
                        host, "green", "abc1234")
    assert seen == "HTTP 301, slot None, version None"
    assert host.asked == []


def test_the_certs_step_comes_between_health_and_switch_only_with_tls(
        settings: Settings) -> None:
    names = [step.name for step in Deploy.steps]
    assert names[names.index("health") + 1:names.index("switch")] == ["certs"]
    step = Deploy.steps[names.index("certs")]
    assert step.when(SimpleNamespace(settings=with_https(settings)))
    assert not step.when(SimpleNamespace(settings=settings))


class _CertHost(FakeHost):
    """A FakeHost whose proxy presents `der` over HTTPS; `verifies` says whether it passes
    a verifying context."""

    def __init__(self, der: bytes, *, verifies: bool = True, status: int = 200) -> None:
        super().__init__()
        self.der, self.verifies, self.status = der, verifies, status

    def https_get(self, address: str, port: int, path: str, *, timeout: float,
                  server_name: str, context: ssl.SSLContext,
                  headers: dict[str, str] | None = None) -> HttpResponse:
        if context.verify_mode != ssl.CERT_NONE and not self.verifies:
            error = ssl.SSLCertVerificationError("certificate verify failed")
            error.verify_message = "self-signed certificate"
            raise error
        return HttpResponse(self.status, {}, b"{}", certificate=self.der)


def der_of(tmp_path: Path, **kwargs: object) -> bytes:
    crt, _ = make_cert(tmp_path, ["app.example.com"], **kwargs)
    return x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def test_https_health_reports_days_left_issuer_and_verification(settings: Settings,
                                                                tmp_path: Path) -> None:
    report = certs.https_health(with_https(settings), _CertHost(der_of(tmp_path, days=90)))
    assert (report.problem, report.warning) == ("", "")
    assert report.line.startswith("https://app.example.com:9443 via fake: HTTP 200, "
                                  "certificate app.example.com, issued by app.example.com")
    assert report.line.endswith("verified against the system trust store")
    assert report.doc["verified"] is True


def test_https_health_warns_within_the_renewal_window(settings: Settings,
                                                      tmp_path: Path) -> None:
    report = certs.https_health(with_https(settings), _CertHost(der_of(tmp_path, days=10)))
    assert report.problem == ""
    # make_cert starts a day ago: 9 of its 10 days are left.
    assert report.warning.startswith("the certificate of https://app.example.com:9443 expires "
                                     "in 9 days (")


def test_https_health_fails_an_expired_or_unverifiable_certificate(settings: Settings,
                                                                   tmp_path: Path) -> None:
    expired = certs.https_health(with_https(settings),
                                 _CertHost(der_of(tmp_path, expired=True)))
    assert expired.problem.startswith("the certificate expired on ")
    unverified = certs.https_health(with_https(settings),
                                    _CertHost(der_of(tmp_path), verifies=False))
    assert unverified.problem == "the certificate does not verify: self-signed certificate"
    assert "NOT verified" in unverified.line


def test_https_health_fails_a_non_200(settings: Settings, tmp_path: Path) -> None:
    report = certs.https_health(with_https(settings), _CertHost(der_of(tmp_path), status=502))
    assert report.problem == "https://app.example.com:9443/health answered HTTP 502"
