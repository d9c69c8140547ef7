"""Getting the image `togather-server:<sha7>` of a commit onto every host.

Strategies: `remote` (default: upload a `git archive` of the commit, build on the host, no
registry), `local` (build here, stream `docker save | docker load` over the SSH connection) and
`registry` (build here, push, pull on the host). An image that is already there with the same
commit label is reused. The release (the commit's files) is always unpacked on the hosts too:
the migrations run from it.
"""

from __future__ import annotations

import io
import shlex
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from . import commands as cmd
from . import source
from .config import Settings
from .errors import CommandError
from .hosts import Host, LocalHost
from .state import iso

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
        return source.archive(self.settings.root, self.commit)

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


def ensure_image(build: Build, host: Host) -> bool:
    """Make the image exist on `host`. True when it had to be built or shipped."""
    upload_release(build, host)
    if image_present(host, build.image, build.commit):
        return False
    if build.settings.build["strategy"] == "remote":
        host.run(build.command(), timeout=build.settings.build["timeout"],
                 what=f"docker build of {build.image}")
    else:
        build_locally_and_ship(build, host)
    return True


def build_locally_and_ship(build: Build, host: Host) -> None:
    settings = build.settings
    local = LocalHost()
    if not image_present(local, build.image, build.commit):
        with tempfile.TemporaryDirectory(prefix="togather-build-") as tmp:
            with tarfile.open(fileobj=io.BytesIO(build.archive)) as tar:
                tar.extractall(tmp, filter="data")
            local.run(build.command(tmp), timeout=settings.build["timeout"],
                      what=f"local docker build of {build.image}")
    if isinstance(host, LocalHost):
        return
    if settings.build["strategy"] == "registry":
        remote_ref = f"{settings.build['registry'].rstrip('/')}/{build.image}"
        local.run(f"docker tag {q(build.image)} {q(remote_ref)} && docker push {q(remote_ref)}",
                  timeout=settings.build["timeout"], what=f"docker push {remote_ref}")
        host.run(f"docker pull {q(remote_ref)} && docker tag {q(remote_ref)} {q(build.image)}",
                 timeout=settings.build["timeout"], what=f"docker pull {remote_ref}")
        return
    with subprocess.Popen(["docker", "save", build.image], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as save:
        assert save.stdout is not None
        result = host.stream_into("docker load --quiet", save.stdout,
                                  timeout=settings.build["timeout"])
    if save.returncode != 0 or not result.ok:
        detail = host.redact(result.stderr.strip())[-200:] or "docker save failed"
        raise CommandError(f"shipping {build.image} to {host.name} (docker save | docker load) "
                           f"failed: {detail}")
