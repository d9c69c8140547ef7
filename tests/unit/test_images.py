"""The image strategies' two phases (`publish` once, `ensure_on_host` per host) against fake
hosts: the registry strategy's push, reuse, pull by digest, login on stdin only, and its errors."""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import IO

import pytest
import requests

from togather_tasks import images, registry
from togather_tasks.config import Settings
from togather_tasks.hosts import Result

from .fakehost import FakeHost, failed, ok

COMMIT = "abc1234" + "0" * 33
DIGEST = "sha256:" + "ef" * 32
REMOTE = "registry.example.com:5000/team/togather-server:abc1234"
BY_DIGEST = f"registry.example.com:5000/team/togather-server@{DIGEST}"
USER, PASSWORD = "ci-deployer", "registry-password-123456"


class StdinHost(FakeHost):
    """A FakeHost that keeps what each streamed command got on its standard input."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.stdin: list[tuple[str, bytes]] = []

    def _stream_into(self, command: str, source: IO[bytes], timeout: float) -> Result:
        self.stdin.append((command, source.read()))
        return super()._stream_into(command, io.BytesIO(), timeout)


def registry_settings(settings: Settings, *, login: bool = False, **build: str) -> Settings:
    secrets = {**settings.secrets}
    if login:
        secrets.update(DEPLOY_REGISTRY_USERNAME=USER, DEPLOY_REGISTRY_PASSWORD=PASSWORD)
    return dataclasses.replace(settings, secrets=secrets, build={
        **settings.build, "strategy": "registry", "registry": "registry.example.com:5000/team",
        **build})


def make_build(settings: Settings) -> images.Build:
    return images.Build(settings, COMMIT, datetime(2026, 12, 1, tzinfo=UTC))


def builder_with_image() -> StdinHost:
    host = StdinHost("local")
    host.on("org.opencontainers.image.revision", ok(COMMIT))
    host.on("docker push", ok(f"abc1234: digest: {DIGEST} size: 1570\n"))
    host.on("mktemp -d", ok("/tmp/togather-docker-config.Ab12\n"))
    return host


@pytest.fixture
def no_registry_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "remote_digest", lambda settings, ref: None)


@pytest.mark.parametrize("strategy", ["remote", "local"])
def test_publish_has_nothing_to_do_without_a_registry(settings: Settings, strategy: str) -> None:
    settings = dataclasses.replace(settings, build={**settings.build, "strategy": strategy})
    session = SimpleNamespace(primary=FakeHost("web1"), local=FakeHost("local"))
    published = images.publish(make_build(settings), session)
    assert published == images.Published("togather-server:abc1234")
    assert not session.primary.commands and not session.local.commands


@pytest.mark.usefixtures("no_registry_answer")
def test_publish_pushes_once_and_returns_the_pushed_digest(settings: Settings) -> None:
    local = builder_with_image()
    session = SimpleNamespace(primary=FakeHost("web1"), local=local)
    published = images.publish(make_build(registry_settings(settings)), session)
    assert published == images.Published("togather-server:abc1234", BY_DIGEST)
    assert local.ran("docker push") == [
        f"docker tag togather-server:abc1234 {REMOTE} && docker push {REMOTE}"]
    assert not session.primary.commands


@pytest.mark.usefixtures("no_registry_answer")
def test_first_host_builds_and_pushes_there(settings: Settings) -> None:
    primary = builder_with_image()
    session = SimpleNamespace(primary=primary, local=FakeHost("local"))
    settings = registry_settings(settings, registry_build="first-host")
    assert images.publish(make_build(settings), session).digest == BY_DIGEST
    assert primary.ran("docker push") and not session.local.commands


def test_a_tag_the_registry_has_is_reused_without_a_build(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "remote_digest", lambda settings, ref: DIGEST)
    session = SimpleNamespace(primary=FakeHost("web1"), local=FakeHost("local"))
    published = images.publish(make_build(registry_settings(settings)), session)
    assert published.digest == BY_DIGEST
    assert not session.local.commands


@pytest.mark.usefixtures("no_registry_answer")
def test_a_login_gets_the_credentials_on_stdin_in_a_private_config(settings: Settings) -> None:
    local = builder_with_image()
    session = SimpleNamespace(primary=FakeHost("web1"), local=local)
    images.publish(make_build(registry_settings(settings, login=True)), session)
    [(login, stdin)] = local.stdin
    assert login.startswith("IFS= read -r user && DOCKER_CONFIG=/tmp/togather-docker-config.Ab12 "
                            "docker login")
    assert stdin == f"{USER}\n{PASSWORD}".encode()
    assert local.ran("DOCKER_CONFIG=/tmp/togather-docker-config.Ab12 docker push")
    assert local.commands[-1] == "rm -rf /tmp/togather-docker-config.Ab12"
    assert not [c for c in local.commands if USER in c or PASSWORD in c]


@pytest.mark.usefixtures("no_registry_answer")
def test_a_refused_login_names_the_registry_and_removes_the_config(settings: Settings) -> None:
    local = builder_with_image()
    local.on("docker login", failed(f"Error response from daemon: login attempt for {USER} "
                                    f"failed with {PASSWORD}"))
    local.redact = lambda text: text.replace(PASSWORD, "***")
    session = SimpleNamespace(primary=FakeHost("web1"), local=local)
    with pytest.raises(registry.RegistryError) as caught:
        images.publish(make_build(registry_settings(settings, login=True)), session)
    assert "docker login to the registry registry.example.com:5000 failed on local" in str(
        caught.value)
    assert PASSWORD not in str(caught.value)
    assert local.commands[-1] == "rm -rf /tmp/togather-docker-config.Ab12"


def test_a_host_pulls_by_digest_and_tags_the_slot_image(settings: Settings) -> None:
    host = FakeHost("web2")
    host.on("docker image inspect --format '{{.Id}}'", failed("No such image"))
    published = images.Published("togather-server:abc1234", BY_DIGEST)
    assert images.ensure_on_host(make_build(registry_settings(settings)), host, published)
    assert host.ran("docker pull") == [f"docker pull --quiet {BY_DIGEST} && "
                                       f"docker tag {BY_DIGEST} togather-server:abc1234"]


def test_a_host_that_has_the_digest_only_tags_it(settings: Settings) -> None:
    host = FakeHost("web2")
    published = images.Published("togather-server:abc1234", BY_DIGEST)
    assert not images.ensure_on_host(make_build(registry_settings(settings)), host, published)
    assert not host.ran("docker pull")
    assert host.ran(f"docker tag {BY_DIGEST} togather-server:abc1234")


def test_a_pull_that_fails_names_the_host_and_the_registry(settings: Settings) -> None:
    host = StdinHost("web2")
    host.on("docker image inspect --format '{{.Id}}'", failed("No such image"))
    host.on("mktemp -d", ok("/srv/togather/staging/.docker-config.Zz99\n"))
    host.on("docker pull", failed("Error response from daemon: Get "
                                  '"http://registry.example.com:5000/v2/": dial tcp: '
                                  "connect: connection refused"))
    published = images.Published("togather-server:abc1234", BY_DIGEST)
    with pytest.raises(registry.RegistryError) as caught:
        images.ensure_on_host(make_build(registry_settings(settings, login=True)), host,
                              published)
    assert str(caught.value).startswith(
        f"web2 could not pull {BY_DIGEST} from the registry registry.example.com:5000: ")
    assert "connection refused" in str(caught.value)
    assert host.commands[-1] == "rm -rf /srv/togather/staging/.docker-config.Zz99"
    assert host.ran("mkdir -p /srv/togather/staging && rm -rf ")


class FakeResponse:
    def __init__(self, status: int, digest: str = "") -> None:
        self.status_code = status
        self.headers = {"Docker-Content-Digest": digest} if digest else {}


def test_remote_digest_asks_for_the_manifest_the_push_made(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def head(url: str, **kwargs: object) -> FakeResponse:
        calls.append((url, kwargs))
        return FakeResponse(200, DIGEST)

    monkeypatch.setattr(requests, "head", head)
    settings = registry_settings(settings, login=True)
    ref = "127.0.0.1:5000/team/togather-server:abc1234"
    assert registry.remote_digest(settings, ref) == DIGEST
    [(url, kwargs)] = calls
    assert url == "http://127.0.0.1:5000/v2/team/togather-server/manifests/abc1234"
    assert "application/vnd.docker.distribution.manifest.v2+json" in kwargs["headers"]["Accept"]
    assert kwargs["auth"] == (USER, PASSWORD)


@pytest.mark.parametrize("answer", [FakeResponse(404), FakeResponse(401),
                                    requests.ConnectionError("refused")])
def test_remote_digest_is_unknown_when_the_registry_does_not_say(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, answer: object) -> None:
    def head(url: str, **kwargs: object) -> object:
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(requests, "head", head)
    assert registry.remote_digest(registry_settings(settings), REMOTE) is None


def test_plain_http_only_for_a_loopback_registry() -> None:
    assert registry.scheme("127.0.0.1:5000") == "http"
    assert registry.scheme("localhost:5000") == "http"
    assert registry.scheme("[::1]:5000") == "http"
    assert registry.scheme("registry.invalid:5000") == "https"


@pytest.mark.usefixtures("no_registry_answer")
def test_first_host_builds_from_the_release_before_the_hosts_are_prepared(
        settings: Settings) -> None:
    primary = StdinHost("web1")
    primary.on("docker push", ok(f"abc1234: digest: {DIGEST} size: 1570\n"))
    settings = registry_settings(settings, registry_build="first-host")
    images.publish(make_build(settings), SimpleNamespace(primary=primary, local=FakeHost()))
    mkdir, build, push = (primary.commands.index(primary.ran(fragment)[0]) for fragment in
                          ("mkdir -p /srv/togather/staging/releases", "docker build",
                           "docker push"))
    assert mkdir < build < push


def test_docker_hub_is_not_asked_directly(settings: Settings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests, "head", lambda *a, **k: pytest.fail("no HEAD expected"))
    assert registry.remote_digest(registry_settings(settings), "team/app:abc1234") is None


@pytest.mark.usefixtures("no_registry_answer")
def test_a_refused_push_names_the_registry_and_the_builder(settings: Settings) -> None:
    local = builder_with_image()
    local.on("docker push", failed("Get \"https://registry.example.com:5000/v2/\": dial tcp: "
                                   "connect: connection refused"))
    session = SimpleNamespace(primary=FakeHost("web1"), local=local)
    with pytest.raises(registry.RegistryError, match=(
            f"pushing {REMOTE} to the registry registry.example.com:5000 from local failed: "
            ".*connection refused")):
        images.publish(make_build(registry_settings(settings)), session)


def test_the_dry_run_shows_one_push_and_a_pull_by_digest_per_host(settings: Settings) -> None:
    build = make_build(registry_settings(settings))
    assert images.publish_plan(build)[1] == (
        f"[local] docker tag togather-server:abc1234 {REMOTE} && docker push {REMOTE}")
    by_digest = REMOTE.replace(":abc1234", "@<pushed digest>")
    assert images.host_plan(build) == (f"docker pull --quiet '{by_digest}' && "
                                       f"docker tag '{by_digest}' togather-server:abc1234")
