"""Getting the image `togather-server:<sha7>` of a commit onto every host.

Two phases, so that a fleet builds once: `publish` (once per deploy) and `ensure_on_host` (per
host, independent of the other hosts). Strategies:
- `remote` (default): upload a `git archive` of the commit, build on each host; no registry.
- `local`: build here, stream `docker save | docker load` over each host's SSH connection.
- `registry`: build once (here, or on the first host with `build.registry_build: first-host`),
  push to `build.registry`, and on each host pull by the pushed digest and tag it with the
  slot's local name, so compose runs exactly the pushed content. A tag already in the registry
  is reused without a build.
An image that is already there with the same commit label (or digest) is reused. The release
(the commit's files) is always unpacked on the hosts too: the migrations run from it.
"""

from __future__ import annotations

import io
import shlex
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from . import commands as cmd
from . import registry, source
from .config import Settings
from .errors import CommandError
from .hosts import Host, LocalHost
from .registry import RegistryError
from .state import iso

if TYPE_CHECKING:
    from .session import Session

q = shlex.quote
REVISION_LABEL = "org.opencontainers.image.revision"


@dataclass
class Build:
    settings: Settings
    commit: str
    built_at: datetime

    @property
    def sha7(self) -> str:
        return self.commit[:7]

    @property
    def image(self) -> str:
        return cmd.image_ref(self.settings, self.sha7)

    @cached_property
    def archive(self) -> bytes:
        return source.archive(self.settings.source_root, self.commit)

    def release_dir(self) -> str:
        return cmd.Layout(self.settings.remote_dir).release(self.sha7)

    def command(self, release: str | None = None) -> str:
        """`docker build` of the release unpacked at `release` (default: on the host)."""
        st = self.settings
        release = release or self.release_dir()
        context = release if st.build["context"] in (".", "./") else \
            f"{release}/{st.build['context'].strip('/')}"
        args = {"GIT_COMMIT": self.commit, "VERSION": self.sha7,
                "BUILD_TIMESTAMP": iso(self.built_at),
                **{k: str(v) for k, v in st.build["args"].items()}}
        parts = ["docker", "build", "--quiet", "--tag", q(self.image), "--file",
                 q(f"{release}/{st.build['dockerfile']}" if st.build["context"] in (".", "./")
                   else f"{context}/{st.build['dockerfile']}")]
        for key, value in args.items():
            parts += ["--build-arg", q(f"{key}={value}")]
        parts += ["--label", q(f"{REVISION_LABEL}={self.commit}"),
                  "--label", q(f"org.opencontainers.image.version={self.sha7}"),
                  "--label", q(f"org.opencontainers.image.created={iso(self.built_at)}"),
                  q(context)]
        return " ".join(parts)


def image_present(host: Host, image: str, commit: str) -> bool:
    fmt = "{{index .Config.Labels \"" + REVISION_LABEL + "\"}}"
    result = host.run(f"docker image inspect --format {q(fmt)} {q(image)}", check=False,
                      timeout=60)
    return result.ok and result.stdout.strip() == commit


def upload_release(build: Build, host: Host) -> str:
    """Unpack the commit's files under releases/<sha7> on the host (once)."""
    layout = cmd.Layout(build.settings.remote_dir)
    release = build.release_dir()
    if host.run(f"test -d {q(release)}", check=False).ok:
        return release
    tar = host.write_temp(layout.releases, build.archive, mode=0o600)
    tmp = f"{layout.releases}/.{build.sha7}.partial"
    host.run(f"rm -rf {q(tmp)} && mkdir -p {q(tmp)} && tar -xf {q(tar)} -C {q(tmp)} && "
             f"rm -f {q(tar)} && mv {q(tmp)} {q(release)}", timeout=300,
             what="unpacking the release")
    return release


# One local build at a time (see ship).
_LOCAL_BUILD = threading.Lock()


@dataclass(frozen=True)
class Published:
    """What every host gets: the local tag compose runs, and for the registry strategy the
    pushed content's `repository@sha256:...` that the hosts pull."""

    image: str
    digest: str | None = None

    @property
    def label(self) -> str:
        """For progress lines: the tag and, when pulled by digest, the digest's start."""
        return f"{self.image} ({self.digest.split('@')[1][:19]})" if self.digest else self.image


def publish(build: Build, session: Session) -> Published:
    """Once per deploy: for `registry`, the image in the registry (reused, or built and
    pushed); the other strategies have nothing to do before the hosts."""
    if build.settings.build["strategy"] != "registry":
        return Published(build.image)
    if build.settings.build["registry_build"] == "first-host":
        return publish_from(build, session.primary, on_host=True)
    return publish_from(build, session.local, on_host=False)


def publish_from(build: Build, builder: Host, *, on_host: bool) -> Published:
    """The registry's digest for the commit's tag: the one it has, else built on `builder`
    (a deploy host when `on_host`, else this machine) and pushed from there."""
    remote = cmd.registry_ref(build.settings, build.sha7)
    digest = registry.remote_digest(build.settings, remote)
    if digest is None:
        build_on(build, builder, on_host=on_host)
        digest = push(build, builder, remote, build.settings.remote_dir if on_host else None)
    return Published(build.image, cmd.digest_ref(remote, digest))


def build_on(build: Build, builder: Host, *, on_host: bool) -> None:
    if image_present(builder, build.image, build.commit):
        return
    if on_host:
        # Before the hosts are prepared: the releases directory may not exist yet.
        builder.run(f"mkdir -p {q(cmd.Layout(build.settings.remote_dir).releases)}", timeout=30)
        upload_release(build, builder)
        builder.run(build.command(), timeout=build.settings.build["timeout"],
                    what=f"docker build of {build.image}")
    else:
        build_here(build, builder)


def push(build: Build, builder: Host, remote: str, config_parent: str | None) -> str:
    registry_name = cmd.registry_host(remote)
    with registry.docker_config(builder, build.settings, config_parent) as config:
        result = builder.run(cmd.docker_push_command(build.image, remote, config),
                             timeout=build.settings.build["timeout"], check=False)
    digest = cmd.parse_push_digest(result.stdout)
    if not result.ok or digest is None:
        detail = cmd.bounded(cmd.tool_error(result.stdout, result.stderr, result.exit_status),
                             builder.redact, 300)
        raise RegistryError(f"pushing {remote} to the registry {registry_name} from "
                            f"{builder.name} failed: {detail}",
                            hint="Check that the registry is up and accepts pushes. Nothing "
                                 "was switched.")
    return digest


def ensure_on_host(build: Build, host: Host, published: Published) -> bool:
    """Make the image exist on `host`. True when it had to be built, loaded or pulled."""
    upload_release(build, host)
    if published.digest:
        return pull_by_digest(build, host, published.digest)
    if image_present(host, build.image, build.commit):
        return False
    if build.settings.build["strategy"] == "remote":
        host.run(build.command(), timeout=build.settings.build["timeout"],
                 what=f"docker build of {build.image}")
    else:
        ship(build, host)
    return True


def ensure_image(build: Build, host: Host) -> bool:
    """Both phases for one host, publishing from this machine (a rollback's rebuild)."""
    published = Published(build.image)
    if build.settings.build["strategy"] == "registry":
        published = publish_from(build, LocalHost(redact=host.redact), on_host=False)
    return ensure_on_host(build, host, published)


def pull_by_digest(build: Build, host: Host, by_digest: str) -> bool:
    """Tag the pushed content as the slot image; pull it first unless the host has it."""
    if host.run(cmd.image_exists_command(by_digest), timeout=60, check=False).ok:
        host.run(cmd.docker_tag_command(by_digest, build.image), timeout=60,
                 what=f"tagging {build.image}")
        return False
    settings = build.settings
    registry_name = cmd.registry_host(by_digest)
    with registry.docker_config(host, settings, settings.remote_dir) as config:
        result = host.run(cmd.docker_pull_command(by_digest, build.image, config),
                          timeout=settings.build["timeout"], check=False)
    if not result.ok:
        detail = cmd.bounded(cmd.tool_error(result.stdout, result.stderr, result.exit_status),
                             host.redact, 300)
        raise RegistryError(f"{host.name} could not pull {by_digest} from the registry "
                            f"{registry_name}: {detail}",
                            hint=f"Check that {registry_name} is up and reachable from "
                                 f"{host.name}. Nothing was switched: the old version keeps "
                                 "serving.")
    return True


def build_here(build: Build, local: Host) -> None:
    """Build on this machine from the commit's files unpacked in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="togather-build-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(build.archive)) as tar:
            tar.extractall(tmp, filter="data")
        local.run(build.command(tmp), timeout=build.settings.build["timeout"],
                  what=f"local docker build of {build.image}")


def ship(build: Build, host: Host) -> None:
    """`local`: build here (once), stream `docker save | docker load` to the host."""
    local = LocalHost(redact=host.redact)
    with _LOCAL_BUILD:  # the hosts ship in parallel: the first one builds, the others wait
        if not image_present(local, build.image, build.commit):
            build_here(build, local)
    if isinstance(host, LocalHost):
        return
    with subprocess.Popen(["docker", "save", build.image], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as save:
        assert save.stdout is not None
        result = host.stream_into("docker load --quiet", save.stdout,
                                  timeout=build.settings.build["timeout"])
    if save.returncode != 0 or not result.ok:
        detail = host.redact(result.stderr.strip())[-200:] or "docker save failed"
        raise CommandError(f"shipping {build.image} to {host.name} (docker save | docker load) "
                           f"failed: {detail}")


def publish_plan(build: Build) -> list[str]:
    """What a dry run shows for `publish`, each line prefixed with where it runs."""
    if build.settings.build["strategy"] != "registry":
        return []
    remote = cmd.registry_ref(build.settings, build.sha7)
    where = build.settings.primary_host if build.settings.build["registry_build"] == \
        "first-host" else "local"
    return [f"[{where}] unless the registry has {remote}: {build.command('<checkout>')}",
            f"[{where}] {cmd.docker_push_command(build.image, remote, None)}"]


def host_plan(build: Build) -> str:
    """What a dry run shows for `ensure_on_host` on each host."""
    strategy = build.settings.build["strategy"]
    if strategy == "registry":
        remote = cmd.registry_ref(build.settings, build.sha7)
        return cmd.docker_pull_command(cmd.digest_ref(remote, "<pushed digest>"), build.image,
                                       None)
    return build.command() if strategy == "remote" else "docker save (here) | docker load --quiet"
