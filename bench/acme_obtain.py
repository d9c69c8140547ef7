"""How long HTTPS certificates take from the test bed's Pebble (issue 10): one run, about a
minute.

It deploys a throwaway copy of examples/demo to the staging test-bed host with `proxy.tls.acme`
pointing at Pebble (scripts/testbed-acme.sh), its proxy on port 9080 (Pebble's HTTP-01 port) of
an address of its own (127.77.x.y, its domain resolving there in Pebble's DNS), then reports:

  - the deploy's `certs` step on the first deploy (write the site, reload, lego obtains
    through the proxy, install by rename): the time a first deploy spends on HTTPS;
  - the same step on the next deploy (the certificate is reused);
  - `inv certs.renew --force`, several times (an SSH connection, a one-off acme container,
    a new order at Pebble, install by rename): median and all runs;
  - during one more forced renewal, HTTPS requests through the proxy, each on a new TLS
    connection (a full handshake): how many, how many failed, and the serials served (old
    and new). With HAProxy, the default engine, the new certificate comes with a seamless
    reload; with nginx (BenchApp.engine) nginx reads the file at each handshake, no reload.

Everything it creates is removed at the end. Run as root:

    .venv/bin/python bench/acme_obtain.py [--renewals 5]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from zero_downtime import BenchApp, Command, SetupError, free_ports, must

HTTP01_PORT = 9080
CHALLTESTSRV = ("127.0.0.1", 8055)
ACME_ROOT = "/etc/togather-testbed/acme-root.pem"
PEBBLE_API_CA = "/etc/togather-testbed/pebble/api-ca.pem"


def challtestsrv(endpoint: str, **body: object) -> None:
    import http.client
    conn = http.client.HTTPConnection(*CHALLTESTSRV, timeout=5)
    try:
        conn.request("POST", f"/{endpoint}", body=json.dumps(body))
        if conn.getresponse().status != 200:
            raise SetupError(f"pebble-challtestsrv /{endpoint} failed")
    finally:
        conn.close()


class TlsBenchApp(BenchApp):
    """BenchApp with HTTPS from Pebble, its proxy on ADDRESS:9080 and ADDRESS:https."""

    @property
    def address(self) -> str:
        return f"127.77.{int(self.tag[:2], 16)}.{max(int(self.tag[2:4], 16), 1)}"

    @property
    def domain(self) -> str:
        return f"{self.name}.togather.test"

    def pick_ports(self) -> dict[str, int]:
        blue, green, https = free_ports(3)
        return {"proxy": HTTP01_PORT, "blue": blue, "green": green, "https": https}

    def environment(self) -> dict:
        return {**super().environment(),
                "public_url": f"http://{self.address}:{HTTP01_PORT}",
                "proxy": {"bind": self.address, "tls": {
                    "acme": {"domains": [self.domain], "email": "bench@togather.test",
                             "directory": "https://127.0.0.1:14000/dir",
                             "ca_bundle": PEBBLE_API_CA},
                    "verify_ca": ACME_ROOT, "redirect": False}}}


def https_load(app: TlsBenchApp, done: threading.Event, out: dict[str, list]) -> None:
    """New-connection HTTPS requests until `done` (at most 120 s), verifying against
    Pebble's root; failures and serials seen go to `out`."""
    context = ssl.create_default_context(cafile=ACME_ROOT)
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection((app.address, app.ports["https"]), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=app.domain) as tls:
                serial = x509.load_der_x509_certificate(tls.getpeercert(True)).serial_number
                tls.sendall(f"GET /health HTTP/1.1\r\nHost: {app.domain}\r\n"
                            "Connection: close\r\n\r\n".encode())
                status = tls.recv(64).split(b" ")[1]
            out["ok" if status == b"200" else "failed"].append(serial)
        except (OSError, IndexError) as exc:
            out["failed"].append(repr(exc))


def step_seconds(command: Command, step: str) -> float:
    if step not in command.steps():
        raise SetupError(f"no `{step}` step line in the deploy's output:\n{command.tail()}")
    return command.steps()[step][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renewals", type=int, default=5)
    args = parser.parse_args()
    app = TlsBenchApp(Path(tempfile.mkdtemp(prefix="togather-bench-acme-")))
    leftovers: list[str] = []
    try:
        app.setup()
        challtestsrv("add-a", host=app.domain, addresses=[app.address])
        first = must(app.inv("deploy", f"--env={app.env}"), "first deploy")
        obtain = step_seconds(first, "certs")
        app.commit("v2")
        second = must(app.inv("deploy", f"--env={app.env}"), "second deploy")
        reuse = step_seconds(second, "certs")
        renewals = []
        for _ in range(args.renewals):
            out = must(app.inv("certs.renew", f"--env={app.env}", "--force"), "certs.renew")
            renewals.append(out.wall_s)
            if not re.search(r": renewed: ", out.output):
                raise SetupError(f"certs.renew --force did not renew:\n{out.output}")
        done, seen = threading.Event(), {"ok": [], "failed": []}
        client = threading.Thread(target=https_load, args=(app, done, seen))
        client.start()
        try:
            must(app.inv("certs.renew", f"--env={app.env}", "--force"), "certs.renew")
            time.sleep(0.5)
        finally:
            done.set()
            client.join(timeout=30)
        print(f"ACME (Pebble) certificate for {app.domain}, HTTP-01 through the proxy")
        print(f"  first deploy, certs step (obtain): {obtain:.1f} s")
        print(f"  next deploy, certs step (reuse):   {reuse:.1f} s")
        print(f"  inv certs.renew --force: median {statistics.median(renewals):.1f} s "
              f"(runs: {', '.join(f'{s:.1f}' for s in renewals)})")
        print(f"  during a forced renewal: {len(seen['ok']) + len(seen['failed'])} HTTPS "
              f"requests on new connections, {len(seen['failed'])} failed, "
              f"{len(set(seen['ok']))} certificates served in turn")
        return 0
    except SetupError as exc:
        print(f"bench: setup failed: {exc}", file=sys.stderr)
        return 1
    finally:
        leftovers += release(app)
        for line in leftovers:
            print(f"bench: left behind, remove by hand: {line}", file=sys.stderr)



def release(app) -> list[str]:
    """The test domain's DNS record removed and the throwaway app cleaned up; what could not
    be, as commands for the operator (shared with bench/fleet_acme.py)."""
    leftovers = []
    try:
        challtestsrv("clear-a", host=app.domain)
    except (OSError, SetupError):
        leftovers.append(f"pebble-challtestsrv: clear-a {app.domain}")
    return leftovers + app.cleanup()


if __name__ == "__main__":
    sys.exit(main())
