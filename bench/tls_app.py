"""A throwaway bench app (bench/zero_downtime.py's BenchApp) with HTTPS on: `proxy.tls` with a
certificate and key it provides, self-signed and generated into the bench's temporary
directory (the key mode 600, never printed), on a fourth free port (`ports.https`). Plain HTTP
keeps serving the app (`redirect: false`), so one run can load both schemes side by side.

Shared by bench/edge_switch.py (--scheme https) and bench/proxy_throughput.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from zero_downtime import BenchApp, free_ports

DOMAIN = "bench.togather.test"


def certificate(key, domain: str = DOMAIN, days: int = 1):
    """A self-signed certificate for `domain` with `key` (a cryptography private key), valid
    `days` (an x509.Certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def self_signed(directory: Path, domain: str = DOMAIN) -> tuple[Path, Path]:
    """A P-256 key and a self-signed certificate for `domain`, valid one day: (cert, key).
    The key file is created mode 600 (the tool refuses a key others can read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(key, domain)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    crt, pem = directory / "site.crt", directory / "site.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return crt, pem


@dataclass
class TlsBenchApp(BenchApp):
    """BenchApp whose environment has `proxy.tls` (a provided self-signed certificate) and
    `ports.https`; HTTP stays served (no redirect)."""

    def pick_ports(self) -> dict[str, int]:
        return dict(zip(("proxy", "blue", "green", "https"), free_ports(4), strict=True))

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"

    def environment(self) -> dict:
        crt, key = self.tls_dir / "site.crt", self.tls_dir / "site.key"
        return {**super().environment(),
                "proxy": {"tls": {"certificate": str(crt), "key": str(key),
                                  "redirect": False}}}

    def setup(self) -> None:
        self_signed(self.tls_dir)
        super().setup()
