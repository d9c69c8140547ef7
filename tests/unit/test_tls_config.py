"""proxy.tls in deployment.yml: every bad input is a clear config error (exit 10) at load time,
before anything changes; good input resolves to TlsSettings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from togather_tasks import tls
from togather_tasks.errors import ConfigError, ExitCode

from .projects import BASE_CONFIG, Project

NOW = datetime(2026, 12, 6, tzinfo=UTC)


def make_cert(directory: Path, names: list[str], *, days: int = 90, key_mode: int = 0o600,
              name: str = "site", expired: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for `names` and its key, written as name.crt / name.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "x")])
    start = datetime.now(UTC) - timedelta(days=days + 2 if expired else 1)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + timedelta(days=days)))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(key_mode)
    return crt, pem


def with_tls(block: str, ports: str = "{proxy: 9080, blue: 9081, green: 9082, https: 9443}"
             ) -> str:
    """BASE_CONFIG with a top-level `proxy:` block holding `block` (indented under tls)."""
    indented = "".join(f"    {line}\n" for line in block.strip().splitlines())
    return (BASE_CONFIG.replace("ports: {proxy: 9080, blue: 9081, green: 9082}",
                                f"ports: {ports}").replace("proxy:\n  engine: nginx\n", "")
            + f"proxy:\n  tls:\n{indented}  engine: nginx\n")


def problems_of(project: Project) -> list[str]:
    with pytest.raises(ConfigError) as info:
        project.load("staging")
    assert info.value.exit_code == ExitCode.CONFIG_ERROR
    return info.value.problems


def one_problem(project: Project) -> str:
    found = problems_of(project)
    assert len(found) == 1, found
    return found[0]


ACME = """
acme:
  domains: [app.example.com, www.example.com]
  email: ops@example.com
"""


# --- good input -----------------------------------------------------------------------------


def test_acme_defaults(project: Project) -> None:
    project.write_config(with_tls(ACME))
    s = project.load("staging")
    assert s.tls is not None
    assert s.tls.domains == ("app.example.com", "www.example.com")
    assert s.tls.server_name == "app.example.com"
    assert s.tls.https_port == 9443
    assert s.tls.redirect is True
    assert s.tls.hsts is None
    assert s.tls.acme == tls.AcmeSettings("ops@example.com", tls.LETS_ENCRYPT, None, 30)
    assert s.ports["https"] == 9443


def test_no_tls_block_means_plain_http(project: Project) -> None:
    assert project.load("staging").tls is None


def test_https_port_defaults_to_443(project: Project) -> None:
    project.write_config(with_tls(ACME, ports="{proxy: 9080, blue: 9081, green: 9082}"))
    assert project.load("staging").tls.https_port == 443


def test_environment_merges_over_top_level_tls(project: Project) -> None:
    text = with_tls(ACME).replace(
        "    ports: {proxy: 9080, blue: 9081, green: 9082, https: 9443}\n",
        "    ports: {proxy: 9080, blue: 9081, green: 9082, https: 9443}\n"
        "    proxy: {tls: {redirect: false, hsts: 600, acme: {renew_before_days: 20}}}\n", 1)
    project.write_config(text)
    s = project.load("staging")
    assert (s.tls.redirect, s.tls.hsts, s.tls.acme.renew_before_days) == (False, 600, 20)
    assert s.tls.acme.email == "ops@example.com"


def test_environment_can_turn_tls_off(project: Project) -> None:
    text = with_tls(ACME).replace(
        "    ports: {proxy: 9080, blue: 9081, green: 9082, https: 9443}\n",
        "    ports: {proxy: 9080, blue: 9081, green: 9082, https: 9443}\n"
        "    proxy: {tls: null}\n", 1)
    project.write_config(text)
    assert project.load("staging").tls is None


def test_ca_bundle_relative_to_the_project(project: Project) -> None:
    crt, _ = make_cert(project.root / "config", ["ca.example.com"], name="ca")
    project.write_config(with_tls(ACME + "  directory: https://127.0.0.1:14000/dir\n"
                                  "  ca_bundle: config/ca.crt\n"))
    s = project.load("staging")
    assert s.tls.acme.ca_bundle == crt
    assert s.tls.acme.directory == "https://127.0.0.1:14000/dir"


def test_provided_certificate(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com", "*.api.example.com"])
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key\nhsts: 31536000"))
    s = project.load("staging")
    assert s.tls.acme is None
    assert s.tls.certificate == project.root / "tls" / "site.crt"
    assert s.tls.key == project.root / "tls" / "site.key"
    # Without `domains`, the certificate's names: the first one is asked for in SNI.
    assert s.tls.domains == ("app.example.com", "*.api.example.com")
    assert s.tls.hsts == 31536000


def test_provided_certificate_with_domains_it_covers(project: Project) -> None:
    make_cert(project.root / "tls", ["*.example.com"])
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key\n"
                                  "domains: [shop.example.com]"))
    assert project.load("staging").tls.domains == ("shop.example.com",)


# --- bad input ------------------------------------------------------------------------------


def test_neither_acme_nor_certificate(project: Project) -> None:
    project.write_config(with_tls("redirect: true"))
    assert "give either acme" in one_problem(project)


def test_both_acme_and_certificate(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    project.write_config(with_tls(ACME + "certificate: tls/site.crt\nkey: tls/site.key\n"))
    assert "not both" in one_problem(project)


def test_missing_domain(project: Project) -> None:
    project.write_config(with_tls("acme:\n  email: ops@example.com"))
    problem = one_problem(project)
    assert "proxy.tls.acme.domains: missing" in problem


def test_missing_email(project: Project) -> None:
    project.write_config(with_tls("acme:\n  domains: [app.example.com]"))
    assert "proxy.tls.acme.email: missing" in one_problem(project)


@pytest.mark.parametrize("domain, says", [
    ("app_example.com", "not a valid domain name"),
    ("localhost", "not a valid domain name"),
    ("-app.example.com", "not a valid domain name"),
    ("App.Example.com", "not a valid domain name"),
    ("*.example.com", "wildcard needs the DNS-01 challenge"),
    ("10.0.0.1", "an IP address"),
    ("a" * 64 + ".example.com", "not a valid domain name"),
])
def test_bad_domain_syntax(project: Project, domain: str, says: str) -> None:
    project.write_config(with_tls(f"acme:\n  domains: ['{domain}']\n  email: ops@example.com"))
    problem = one_problem(project)
    assert "proxy.tls.acme.domains" in problem and says in problem


def test_bad_email(project: Project) -> None:
    project.write_config(with_tls("acme:\n  domains: [app.example.com]\n  email: ops"))
    assert "is not an e-mail address" in one_problem(project)


def test_directory_must_be_https(project: Project) -> None:
    project.write_config(with_tls(ACME + "  directory: http://acme.example.com/dir\n"))
    assert "proxy.tls.acme.directory" in one_problem(project)


def test_unreadable_ca_bundle(project: Project) -> None:
    project.write_config(with_tls(ACME + "  ca_bundle: config/missing.pem\n"))
    problem = one_problem(project)
    assert "proxy.tls.acme.ca_bundle" in problem and "file not found" in problem


def test_ca_bundle_without_a_certificate(project: Project) -> None:
    (project.root / "config" / "ca.pem").write_text("not a certificate\n")
    project.write_config(with_tls(ACME + "  ca_bundle: config/ca.pem\n"))
    assert "holds no PEM certificate" in one_problem(project)


def test_hsts_true_is_not_a_max_age(project: Project) -> None:
    project.write_config(with_tls(ACME + "hsts: true\n"))
    assert "proxy.tls.hsts" in one_problem(project)


def test_https_port_must_differ(project: Project) -> None:
    project.write_config(with_tls(ACME, ports="{proxy: 9080, blue: 9081, green: 9082, "
                                              "https: 9081}"))
    assert "https must differ" in one_problem(project)


def test_key_without_certificate(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    project.write_config(with_tls("key: tls/site.key"))
    assert "proxy.tls.certificate: missing" in one_problem(project)


def test_key_that_does_not_match_the_certificate(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    make_cert(project.root / "tls", ["app.example.com"], name="other")
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/other.key"))
    problem = one_problem(project)
    assert "proxy.tls.key" in problem and "does not match the certificate" in problem


def test_expired_certificate(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"], expired=True)
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key"))
    problem = one_problem(project)
    assert "proxy.tls.certificate" in problem and "expired on" in problem


def test_unreadable_certificate(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    project.write_config(with_tls("certificate: tls/nope.crt\nkey: tls/site.key"))
    problem = one_problem(project)
    assert "proxy.tls.certificate" in problem and "file not found" in problem


def test_certificate_that_is_a_directory(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    project.write_config(with_tls("certificate: tls\nkey: tls/site.key"))
    assert "is a directory" in one_problem(project)


def test_unreadable_key(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    # Unreadable even for root (the suite's user in CI): a path through a regular file.
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.crt/key"))
    problem = one_problem(project)
    assert "proxy.tls.key" in problem and "cannot read (Not a directory)" in problem


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_mode_too_open(project: Project, mode: int) -> None:
    _, key = make_cert(project.root / "tls", ["app.example.com"], key_mode=mode)
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key"))
    problem = one_problem(project)
    assert f"mode {mode:03o}" in problem and f"chmod 600 {key}" in problem


def test_key_that_is_not_a_key(project: Project) -> None:
    crt, key = make_cert(project.root / "tls", ["app.example.com"])
    key.write_bytes(crt.read_bytes())
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key"))
    assert "is not a PEM private key" in one_problem(project)


def test_encrypted_key(project: Project) -> None:
    _, key = make_cert(project.root / "tls", ["app.example.com"])
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase-123")))
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key"))
    assert "encrypted with a passphrase" in one_problem(project)


def test_certificate_that_is_not_a_certificate(project: Project) -> None:
    crt, _ = make_cert(project.root / "tls", ["app.example.com"])
    crt.write_text("hello\n")
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key"))
    assert "is not a PEM certificate" in one_problem(project)


def test_domain_the_certificate_does_not_cover(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"])
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/site.key\n"
                                  "domains: [shop.example.com]"))
    problem = one_problem(project)
    assert "shop.example.com is not covered" in problem and "app.example.com" in problem


def test_every_problem_at_once(project: Project) -> None:
    make_cert(project.root / "tls", ["app.example.com"], expired=True)
    make_cert(project.root / "tls", ["app.example.com"], name="other", key_mode=0o640)
    project.write_config(with_tls("certificate: tls/site.crt\nkey: tls/other.key"))
    found = problems_of(project)
    assert len(found) == 3, found
    assert any("mode 640" in p for p in found)
    assert any("does not match" in p for p in found)
    assert any("expired" in p for p in found)


def test_key_content_never_in_a_problem(project: Project) -> None:
    crt, key = make_cert(project.root / "tls", ["app.example.com"], key_mode=0o644)
    make_cert(project.root / "tls", ["app.example.com"], name="other")
    project.write_config(with_tls("certificate: tls/other.crt\nkey: tls/site.key"))
    secret_line = key.read_text().splitlines()[1]
    assert all(secret_line not in p for p in problems_of(project))


# --- pure helpers ---------------------------------------------------------------------------


def test_covers_wildcards_one_label_only() -> None:
    assert tls.covers(("*.example.com",), "a.example.com")
    assert not tls.covers(("*.example.com",), "a.b.example.com")
    assert not tls.covers(("*.example.com",), "example.com")
    assert tls.covers(("example.com",), "example.com")


def test_needs_certificate(tmp_path: Path) -> None:
    settings = tls.TlsSettings(("a.example.com",), 443, True, None,
                               tls.AcmeSettings("o@example.com", tls.LETS_ENCRYPT, None, 30),
                               None, None)
    fresh = tls.CertificateInfo(("a.example.com",), "Pebble", NOW + timedelta(days=80), "1")
    assert tls.needs_certificate(settings, fresh, NOW) is None
    assert tls.needs_certificate(settings, None, NOW) == "no certificate on the host yet"
    other = tls.CertificateInfo(("b.example.com",), "Pebble", NOW + timedelta(days=80), "1")
    assert "domains changed" in tls.needs_certificate(settings, other, NOW)
    old = tls.CertificateInfo(("a.example.com",), "Pebble", NOW + timedelta(days=10), "1")
    assert tls.needs_certificate(settings, old, NOW) == "it expires in 10 days"
    assert tls.needs_certificate(settings, fresh, NOW, issued_by=tls.LETS_ENCRYPT) is None
    assert tls.needs_certificate(settings, fresh, NOW, issued_by="https://pebble/dir") == \
        f"the ACME server changed (https://pebble/dir -> {tls.LETS_ENCRYPT})"
    assert "was provided" in tls.needs_certificate(settings, fresh, NOW, issued_by="provided")


def test_describe(tmp_path: Path) -> None:
    crt, _ = make_cert(tmp_path, ["a.example.com", "b.example.com"], days=30)
    info = tls.describe(tls.load_chain(crt.read_bytes())[0])
    assert info.domains == ("a.example.com", "b.example.com")
    assert info.issuer == "a.example.com"
    assert 28 < info.days_left() < 30
    assert info.as_dict()["domains"] == ["a.example.com", "b.example.com"]
