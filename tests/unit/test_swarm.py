"""The swarm engine's pure parts: configuration, the service commands, the convergence verdict."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import pytest

from togather_tasks import swarm
from togather_tasks.config import Settings
from togather_tasks.errors import ConfigError

from .projects import ADMIN_API_KEY, BASE_CONFIG, DB_PASSWORD, JWT_SECRET, Project

SWARM_CONFIG = BASE_CONFIG + """\
  cluster:
    engine: swarm
    hosts: [deploy@m1.example.com, deploy@w1.example.com, deploy@w2.example.com]
    ports: {proxy: 8090}
    build: {strategy: registry, registry: registry.example.com:5000/team}
"""
IMAGE = "registry.example.com:5000/team/togather-server@sha256:" + "a" * 64


@pytest.fixture
def cluster(project: Project) -> Settings:
    project.write_config(SWARM_CONFIG)
    project.write_env("cluster")
    return project.load("cluster")


def test_engine_defaults_to_compose(settings: Settings) -> None:
    assert settings.engine == "compose"


def test_engine_swarm_is_read(cluster: Settings) -> None:
    assert cluster.engine == "swarm"
    assert cluster.public_dict()["engine"] == "swarm"


def test_engine_swarm_needs_the_registry_strategy(project: Project) -> None:
    project.write_config(SWARM_CONFIG.replace(
        "    build: {strategy: registry, registry: registry.example.com:5000/team}\n", ""))
    project.write_env("cluster")
    with pytest.raises(ConfigError) as err:
        project.load("cluster")
    assert "engine swarm needs build.strategy registry" in str(err.value)


def test_an_unknown_engine_is_a_config_error(project: Project) -> None:
    project.write_config(SWARM_CONFIG.replace("engine: swarm", "engine: kubernetes"))
    project.write_env("cluster")
    with pytest.raises(ConfigError) as err:
        project.load("cluster")
    assert "engine" in str(err.value)


def test_replicas_and_order_leave_a_node_free_for_start_first(cluster: Settings) -> None:
    assert swarm.replicas(cluster) == 2
    assert swarm.update_order(cluster) == "start-first"
    assert swarm.update_order(cluster, available=2) == "stop-first"  # a node drained or down
    one = replace(cluster, hosts=cluster.hosts[:1])
    assert swarm.replicas(one) == 1 and swarm.update_order(one) == "stop-first"


def test_the_secret_holds_the_app_env_quoted_for_sh_and_is_named_by_its_content(
        cluster: Settings) -> None:
    content = swarm.secret_content(cluster)
    text = content.decode()
    assert f"JWT_SECRET={shlex.quote(JWT_SECRET)}\n" in text
    assert "DEPLOY_" not in text
    # sh reads it back exactly (the password has @ : % /).
    values = dict(line.split("=", 1) for line in text.splitlines())
    assert shlex.split(values["ADMIN_API_KEY"]) == [ADMIN_API_KEY]
    name = swarm.secret_name(cluster, content)
    assert name.startswith("togather-test-cluster-env-") and len(name.rsplit("-", 1)[1]) == 12
    assert swarm.secret_name(cluster, content + b"X=1\n") != name


def test_no_secret_reaches_the_service_commands(cluster: Settings) -> None:
    secret = swarm.secret_name(cluster, swarm.secret_content(cluster))
    lines = [swarm.create_command(cluster, IMAGE, "abc1234", secret, ["python3", "app.py"]),
             swarm.update_command(cluster, IMAGE, "abc1234", secret, ["old-secret"],
                                  ["python3", "app.py"])]
    for line in lines:
        for value in (DB_PASSWORD, JWT_SECRET, ADMIN_API_KEY):
            assert value not in line
        assert "--env" not in line and "-e " not in line


def test_create_command_spec(cluster: Settings) -> None:
    words = shlex.split(swarm.create_command(cluster, IMAGE, "abc1234", "s1",
                                             ["python3", "-u", "/app/server.py"]))
    assert words[:3] == ["docker", "service", "create"]

    def after(flag: str) -> str:
        return words[words.index(flag) + 1]

    assert after("--name") == "togather-test-cluster"
    assert after("--publish") == "mode=host,target=8080,published=8090,protocol=tcp"
    assert after("--replicas") == "2" and after("--replicas-max-per-node") == "1"
    assert after("--update-order") == "start-first"
    assert after("--update-failure-action") == "rollback"
    assert after("--update-parallelism") == "1"
    assert after("--secret") == "source=s1,target=togather-app-env"
    assert "/health" in after("--health-cmd")
    assert after("--entrypoint") == "/bin/sh"
    # The image, then the wrapper and the image's own command as arguments.
    i = words.index(IMAGE)
    assert words[i + 1:] == ["-c", swarm.WRAPPER, "sh", "python3", "-u", "/app/server.py"]


def test_update_command_swaps_the_secret_and_keeps_the_command(cluster: Settings) -> None:
    words = shlex.split(swarm.update_command(cluster, IMAGE, "abc1234", "s2", ["s1"],
                                             ["python3", "app.py"], order="stop-first"))
    assert words[-1] == "togather-test-cluster"
    assert words[words.index("--image") + 1] == IMAGE
    assert words[words.index("--secret-rm") + 1] == "s1"
    assert words[words.index("--secret-add") + 1] == "source=s2,target=togather-app-env"
    assert words[words.index("--update-order") + 1] == "stop-first"
    assert shlex.split(words[words.index("--args") + 1]) == ["-c", swarm.WRAPPER, "sh",
                                                             "python3", "app.py"]
    same = shlex.split(swarm.update_command(cluster, IMAGE, "v", "s1", ["s1"], ["x"]))
    assert "--secret-rm" not in same and "--secret-add" not in same


def test_command_of_an_image_config() -> None:
    assert swarm.command_of({"Entrypoint": ["tini", "--"], "Cmd": ["app"]}) == \
        ["tini", "--", "app"]
    assert swarm.command_of({"Entrypoint": None, "Cmd": None}) == []


def _view(image: str, update: dict | None, tasks: list[tuple[str, str, str]]) -> swarm.ServiceView:
    spec = {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": image}},
                     "Mode": {"Replicated": {"Replicas": 2}}}}
    if update is not None:
        spec["UpdateStatus"] = update
    raw = [{"ID": f"t{i}", "NodeID": f"n{i}", "DesiredState": desired,
            "Status": {"State": state}, "Spec": {"ContainerSpec": {"Image": img}}}
           for i, (state, desired, img) in enumerate(tasks)]
    return swarm.parse_view(json.dumps(spec) + "\n" + json.dumps(raw) + "\n")


NEW, OLD = IMAGE, IMAGE.replace("a" * 64, "b" * 64)


def test_progress_done_when_every_replica_runs_the_new_image() -> None:
    view = _view(NEW, {"State": "completed", "StartedAt": "t2"},
                 [("running", "running", NEW), ("running", "running", NEW),
                  ("shutdown", "shutdown", OLD)])
    assert swarm.judge_progress(view, NEW, 2, "t1").done


def test_progress_waits_while_updating_or_rolling_back() -> None:
    for state in ("updating", "rollback_started"):
        view = _view(OLD if state == "rollback_started" else NEW,
                     {"State": state, "StartedAt": "t2"},
                     [("running", "running", OLD), ("starting", "running", NEW)])
        progress = swarm.judge_progress(view, NEW, 2, "t1")
        assert not progress.done and progress.failed is None, state


def test_progress_reports_the_engines_rollback_with_its_reason() -> None:
    view = _view(OLD, {"State": "rollback_completed", "StartedAt": "t2",
                       "Message": "rollback completed"},
                 [("running", "running", OLD), ("running", "running", OLD),
                  ("failed", "shutdown", NEW)])
    view.tasks[2].error = "task: non-zero exit (137): dockerexec: unhealthy container"
    progress = swarm.judge_progress(view, NEW, 2, "t1")
    assert progress.failed and "rollback completed" in progress.failed
    assert "unhealthy container" in progress.failed


def test_an_older_update_status_is_not_this_runs() -> None:
    """Same spec as before (a redeploy of the running digest): no new update; an old
    rollback_completed must not fail it, the running tasks decide."""
    view = _view(NEW, {"State": "rollback_completed", "StartedAt": "t1"},
                 [("running", "running", NEW), ("running", "running", NEW)])
    assert swarm.judge_progress(view, NEW, 2, "t1").done


def test_another_image_without_an_update_is_a_failure() -> None:
    view = _view(OLD, {"State": "completed", "StartedAt": "t2"},
                 [("running", "running", OLD), ("running", "running", OLD)])
    assert "another operation" in (swarm.judge_progress(view, NEW, 2, "t1").failed or "")


def test_a_missing_service_parses() -> None:
    view = swarm.parse_view("null\n[]\n")
    assert not view.exists and view.image is None and view.secrets == []


def test_a_task_without_a_suitable_node_is_unplaceable() -> None:
    """What a node drained or down during a start-first update leaves: a pending task the
    scheduler cannot place (Engine.wait then switches the update to stop-first)."""
    view = _view(NEW, {"State": "updating", "StartedAt": "t2"},
                 [("running", "running", NEW), ("running", "running", OLD),
                  ("pending", "running", NEW), ("pending", "running", NEW),
                  ("shutdown", "shutdown", NEW)])
    view.tasks[2].error = "no suitable node (max replicas per node limit exceed)"
    assert [t.id for t in swarm.unplaceable(view)] == ["t2"]
    view.tasks[2].error = ""
    assert swarm.unplaceable(view) == []  # pending for another reason (e.g. pulling): wait


@pytest.mark.parametrize("operation", ["exec", "maintenance", "cleanup", "certs.show",
                                       "certs.renew"])
def test_compose_only_commands_are_refused_on_a_swarm_environment(
        cluster: Settings, settings: Settings, operation: str) -> None:
    from togather_tasks.cli import refuse_on_swarm
    from togather_tasks.errors import ExitCode, UsageError

    with pytest.raises(UsageError) as err:
        refuse_on_swarm(cluster, operation)
    assert err.value.exit_code == ExitCode.INVALID_ARGUMENTS == 2
    assert "not supported on cluster (engine swarm)" in str(err.value)
    refuse_on_swarm(settings, operation)  # a compose environment: no refusal


@pytest.mark.parametrize("operation", ["deploy", "rollback", "status", "health", "logs", "db",
                                       "lock"])
def test_the_swarm_commands_are_not_refused(cluster: Settings, operation: str) -> None:
    from togather_tasks.cli import refuse_on_swarm

    refuse_on_swarm(cluster, operation)


@pytest.mark.parametrize("args", [("exec", "--command=true"), ("maintenance.on",),
                                  ("maintenance.off",), ("cleanup",), ("cleanup", "--dry-run"),
                                  ("certs.show",), ("certs.renew",)])
def test_compose_only_commands_exit_2_through_the_cli(
        cluster: Settings, project: Project, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...]) -> None:
    """Through the real task collection (in process): exit 2, one `error:` line naming the
    environment and engine, no traceback, and nothing reached a host (the config's hosts do
    not exist: any SSH attempt would fail differently)."""
    from .test_cli import assert_clean, run_in_process

    result = run_in_process(project, capsys, *args, "--env=cluster")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not supported on cluster (engine swarm)" in result.stderr
    assert "Nothing was changed" in result.stderr
    assert_clean(result)
