"""The `local` and `registry` build strategies: build on this machine from the commit, then
ship the image to the host (`docker save | docker load` over the SSH connection, or through a
registry). The default `remote` strategy builds on the host and lives in the pipeline."""

from __future__ import annotations

import io
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Callable

from . import source
from .config import Settings
from .errors import CommandError
from .hosts import Host, LocalHost

q = shlex.quote


def build_locally_and_ship(settings: Settings, host: Host, *, image: str, commit: str,
                           build_command: Callable[[str], str]) -> None:
    local = LocalHost()
    fmt = '{{index .Config.Labels "org.opencontainers.image.revision"}}'
    present = local.run(f"docker image inspect --format {q(fmt)} {q(image)}", check=False,
                        timeout=60)
    if not (present.ok and present.stdout.strip() == commit):
        with tempfile.TemporaryDirectory(prefix="togather-build-") as tmp:
            with tarfile.open(fileobj=io.BytesIO(source.archive(settings.root, commit))) as tar:
                tar.extractall(tmp, filter="data")
            local.run(build_command(tmp), timeout=settings.build["timeout"],
                      what=f"local docker build of {image}")
    if isinstance(host, LocalHost):
        return
    if settings.build["strategy"] == "registry":
        remote_ref = f"{settings.build['registry'].rstrip('/')}/{image}"
        local.run(f"docker tag {q(image)} {q(remote_ref)} && docker push {q(remote_ref)}",
                  timeout=settings.build["timeout"], what=f"docker push {remote_ref}")
        host.run(f"docker pull {q(remote_ref)} && docker tag {q(remote_ref)} {q(image)}",
                 timeout=settings.build["timeout"], what=f"docker pull {remote_ref}")
        return
    with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as save:
        assert save.stdout is not None
        result = host.stream_into("docker load --quiet", save.stdout,
                                  timeout=settings.build["timeout"])
    if save.returncode != 0 or not result.ok:
        raise CommandError(f"shipping {image} to {host.name} (docker save | docker load) "
                           f"failed: {result.stderr.strip()[-200:] or 'docker save failed'}")
