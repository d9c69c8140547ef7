"""Why the nginx engine keeps the private key at a renewal: TLS handshakes while the
certificate file is replaced, with the same key and with a new key.

nginx names the certificate through a variable (tls.https_server_block) and so reads
tls/site.pem at each handshake, the certificate first and the key in a second open. A renewal
installs the new file by rename(2). When the new file carries a new key and the rename lands
between the two opens, nginx pairs the old certificate with the new key and ends that
handshake with an internal-error alert ("key values mismatch" in its log). CI saw one such
failed request in the renewal test; this benchmark shows the rate and that a kept key (lego
renew --reuse-key, what togather-acme does for nginx) removes it.

It runs the product's nginx proxy image (built from docker/nginx when missing) in the host's
network namespace on 127.0.0.1:PORT, with the same two `ssl_certificate` directives as the
product, then for each case: CLIENTS threads each doing full handshakes (a new connection and
one request each) while one thread replaces the file by rename every 2 ms. It prints the
handshakes, the failures and the renames of each case. Nothing is timed against a target.
Everything it creates is removed at the end. Run as root:

    .venv/bin/python bench/cert_swap.py [--seconds 8] [--clients 8] [--port 18443]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tls_app import certificate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from togather_tasks import commands as cmd  # noqa: E402

DOMAIN = "swap.togather.test"
CONTAINER = "togather-bench-cert-swap"
NGINX_CONF = """worker_processes 2;
events {}
error_log /dev/stderr warn;
http {
    map $ssl_server_name $togather_tls_file { default /bench/site.pem; }
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate $togather_tls_file;
        ssl_certificate_key $togather_tls_file;
        location / { return 200 "ok\\n"; }
    }
}
"""


def pem_pair(key: ec.EllipticCurvePrivateKey, days: int) -> bytes:
    """Key then certificate, as togather-acme installs site.pem."""
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
            + certificate(key, DOMAIN, days).public_bytes(serialization.Encoding.PEM))


def handshakes(port: int, seconds: float, clients: int, site: Path,
               versions: tuple[bytes, bytes]) -> tuple[int, int, int]:
    """(handshakes, failures, renames) while `site` alternates between the two versions."""
    context = ssl._create_unverified_context()  # noqa: S323 - counting handshakes only
    stop = time.monotonic() + seconds
    counts = {"ok": 0, "failed": 0, "renames": 0}
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                        context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
                    tls.sendall(f"GET / HTTP/1.0\r\nHost: {DOMAIN}\r\n\r\n".encode())
                    tls.recv(64)
                key = "ok"
            except OSError:
                key = "failed"
            with lock:
                counts[key] += 1

    def swapper() -> None:
        temporary = site.with_name(".site.pem.tmp")
        while time.monotonic() < stop:
            temporary.write_bytes(versions[counts["renames"] % 2])
            os.rename(temporary, site)
            counts["renames"] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    threads.append(threading.Thread(target=swapper))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts["ok"] + counts["failed"], counts["failed"], counts["renames"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=18443)
    args = parser.parse_args(argv)
    image = cmd.proxy_image_ref("nginx")
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
        print(f"building {image} from docker/nginx", flush=True)
        subprocess.run(["docker", "build", "--quiet", "-t", image,
                        str(cmd.DOCKER_DIR / "nginx")], check=True, capture_output=True)
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cases = [("the same key (a renewal with --reuse-key)", (pem_pair(first, 90),
                                                             pem_pair(first, 91))),
             ("a new key at each rename", (pem_pair(first, 90), pem_pair(second, 90)))]
    with tempfile.TemporaryDirectory(prefix="togather-cert-swap-") as work:
        directory = Path(work)
        directory.chmod(0o755)
        site = directory / "site.pem"
        site.write_bytes(cases[0][1][0])
        site.chmod(0o644)  # the worker (nobody) reads it; throwaway keys
        (directory / "nginx.conf").write_text(NGINX_CONF % {"port": args.port})
        subprocess.run(["docker", "rm", "-f", CONTAINER], capture_output=True)
        subprocess.run(["docker", "run", "-d", "--name", CONTAINER, "--network", "host",
                        "-v", f"{directory}:/bench", "--entrypoint", "nginx", image,
                        "-c", "/bench/nginx.conf", "-g", "daemon off;"],
                       check=True, capture_output=True)
        try:
            for _ in range(50):
                try:
                    socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            print(f"nginx ({image}), {args.clients} clients, {args.seconds:g} s per case, "
                  "a new TLS connection per request, the file renamed every 2 ms")
            for label, versions in cases:
                site.write_bytes(versions[0])
                total, failed, renames = handshakes(args.port, args.seconds, args.clients,
                                                    site, versions)
                print(f"  {label}: {total:,} handshakes, {failed:,} failed, {renames:,} renames")
            log = subprocess.run(["docker", "logs", CONTAINER], capture_output=True,
                                 text=True).stderr
            print(f"  nginx logged 'key values mismatch' {log.count('key values mismatch'):,} "
                  "times")
        finally:
            subprocess.run(["docker", "rm", "-f", CONTAINER], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
