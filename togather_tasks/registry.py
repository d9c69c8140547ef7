"""The image registry of the `registry` build strategy: its credentials, `docker login` into a
per-operation DOCKER_CONFIG, and the question "is this tag there already, under which digest?".

Credentials come from the env file (DEPLOY_REGISTRY_USERNAME, DEPLOY_REGISTRY_PASSWORD; the
DEPLOY_ prefix keeps them out of the app's containers) and reach `docker login` on standard
input only. They live in a private directory made for one operation and removed after it,
rather than in the deploy user's ~/.docker followed by a logout: a logout would also drop the
user's own login to that registry, and a run killed before the logout would leave them there.
Without credentials nothing is written and docker uses whatever the user has configured.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from . import commands as cmd
from .config import REGISTRY_PASSWORD, REGISTRY_USERNAME, Settings
from .errors import TogatherError
from .hosts import Host

HEAD_TIMEOUT = 10
LOGIN_TIMEOUT = 60
# Every manifest type a push may create: without them a registry answers with another
# representation of the image, whose digest is not the pushed one.
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


class RegistryError(TogatherError):
    """The registry refused or could not be reached (exit 1, nothing switched)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""

    def login_input(self) -> bytes:
        return f"{self.username}\n{self.password}".encode()


def credentials(settings: Settings) -> Credentials | None:
    username = settings.secrets.get(REGISTRY_USERNAME, "")
    return Credentials(username, settings.secrets.get(REGISTRY_PASSWORD, "")) if username else None


@contextlib.contextmanager
def docker_config(host: Host, settings: Settings, parent: str | None) -> Iterator[str | None]:
    """Logged in to the environment's registry for the time of the block: yields the
    DOCKER_CONFIG directory to use (None when no credentials are configured), removes it
    after, whatever happens."""
    creds = credentials(settings)
    if creds is None:
        yield None
        return
    directory = host.run(cmd.docker_config_dir_command(parent), timeout=30,
                         what="creating a private docker config directory").stdout.strip()
    try:
        login(host, creds, directory, cmd.registry_host(settings.build["registry"]))
        yield directory
    finally:
        host.run(f"rm -rf {cmd.q(directory)}", timeout=30, check=False)


def login(host: Host, creds: Credentials, directory: str, registry: str) -> None:
    result = host.stream_into(cmd.docker_login_command(directory, registry),
                              io.BytesIO(creds.login_input()), timeout=LOGIN_TIMEOUT)
    if not result.ok:
        detail = cmd.bounded(cmd.tool_error(result.stdout, result.stderr, result.exit_status),
                             host.redact, 300)
        raise RegistryError(f"docker login to the registry {registry} failed on {host.name}: "
                            f"{detail}",
                            hint=f"Check {REGISTRY_USERNAME} and {REGISTRY_PASSWORD} in the env "
                                 "file and that the registry is up. Nothing was switched.")


def remote_digest(settings: Settings, ref: str) -> str | None:
    """The digest the registry holds under `ref`'s tag; None when it has none or cannot
    tell (unreachable, a token-based login): then the image is built and pushed, and the push
    says what is wrong if anything is."""
    registry = cmd.registry_host(ref)
    if not ref.startswith(registry + "/"):
        return None  # Docker Hub: a token login that this check does not speak
    repository, _, tag = ref[len(registry) + 1:].rpartition(":")
    url = f"{scheme(registry)}://{registry}/v2/{repository}/manifests/{tag}"
    creds = credentials(settings)
    try:
        response = requests.head(url, headers={"Accept": MANIFEST_TYPES}, timeout=HEAD_TIMEOUT,
                                 auth=(creds.username, creds.password) if creds else None)
    except requests.RequestException:
        return None
    digest = response.headers.get("Docker-Content-Digest", "")
    return digest if response.status_code == 200 and digest.startswith("sha256:") else None


def scheme(registry: str) -> str:
    """Plain HTTP only for a registry on this machine's loopback (Docker's own default
    exception); anything else must speak HTTPS, so credentials never cross a network in
    clear text."""
    host = urlsplit(f"//{registry}").hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return "https"
    loopback = addresses and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                 for a in addresses)
    return "http" if loopback else "https"
