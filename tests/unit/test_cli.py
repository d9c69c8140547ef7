"""The task collection and the command line: exit codes, no tracebacks, no secrets in the
output. A few runs go through the real `inv` in a subprocess; the rest run the same Program
in-process (fast). Only tasks that need no SSH and no Docker are run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from invoke import Program

from togather_tasks import namespace

from .projects import ADMIN_API_KEY, BASE_CONFIG, DB_PASSWORD, JWT_SECRET, Project

TASKS_PY = "from togather_tasks import namespace\n\nns = namespace(__file__)\n"
SECRETS = [DB_PASSWORD, quote(DB_PASSWORD, safe=""), JWT_SECRET, ADMIN_API_KEY]


SUBPROCESS_RUNS = {
    "valid": ("valid", ["config.validate", "--env=staging"]),
    "bad config": ("bad", ["config.validate", "--env=staging"]),
    "no env": ("valid", ["config.validate"]),
    "show": ("valid", ["config.show", "--env=staging"]),
}


@pytest.fixture(scope="module")
def real_cli(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the real `inv` (python -m invoke) for each case of SUBPROCESS_RUNS, all at once."""
    base = tmp_path_factory.mktemp("cli")
    projects = {"valid": Project(base / "valid"), "bad": Project(base / "bad")}
    for p in projects.values():
        p.write_config()
        p.write_env("staging")
        (p.root / "tasks.py").write_text(TASKS_PY)
    projects["bad"].write_config(BASE_CONFIG + "colour: blue\n")
    env = {**os.environ, "HOME": str(base / "home"), "TOGATHER_LOG_DIR": str(base / "logs")}
    env.pop("TOGATHER_DEBUG", None)
    running = {
        case: subprocess.Popen([sys.executable, "-m", "invoke", *args],
                               cwd=projects[name].root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for case, (name, args) in SUBPROCESS_RUNS.items()}
    results = {}
    for case, proc in running.items():
        out, err = proc.communicate(timeout=60)
        results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return {"results": results, "projects": projects}


def run_in_process(project: Project, capsys: pytest.CaptureFixture[str],
                   *args: str) -> subprocess.CompletedProcess[str]:
    """The same parsing, tasks and exit codes as `inv`, without a new interpreter."""
    program = Program(namespace=namespace(project.root), version="test")
    code = 0
    try:
        program.run(["inv", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["inv", *args], code, out, err)


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output


# --- the collection --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deploy", "status", "history", "lock.status", "lock.acquire",
                                  "lock.release", "config.validate", "config.show",
                                  "hosts.trust", "logs", "exec", "audit", "version"])
def test_namespace_exposes_the_task(name: str) -> None:
    assert name in namespace().task_names


def test_namespace_records_the_project_root(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text(TASKS_PY)
    assert namespace(str(tasks)).configuration()["togather"]["root"] == str(tmp_path)
    assert namespace(tmp_path).configuration()["togather"]["root"] == str(tmp_path)


# Tasks about the repository or the package, not an environment.
NO_ENV_TASKS = {"init", "version"}


def test_every_task_takes_env(tmp_path: Path) -> None:
    ns = namespace()
    for name in set(ns.task_names) - NO_ENV_TASKS:
        task = ns[name]
        assert "env" in [arg.name for arg in task.get_arguments()], name


# --- the real CLI ---------------------------------------------------------------------------


def test_config_validate_accepts_a_valid_project(real_cli) -> None:
    result = real_cli["results"]["valid"]
    assert result.returncode == 0, result.stderr
    assert "staging: configuration is valid" in result.stdout
    assert_clean(result)


def test_config_validate_exits_10_for_a_bad_config(real_cli) -> None:
    result = real_cli["results"]["bad config"]
    assert result.returncode == 10
    assert "'colour'" in result.stderr
    assert str(real_cli["projects"]["bad"].config_path) in result.stderr
    assert_clean(result)


def test_config_validate_exits_10_for_bad_secrets(project: Project, capsys) -> None:
    project.write_env("staging", mode=0o644, JWT_SECRET="CHANGE_ME",
                      DATABASE_URL=f"mysql://u:{quote(DB_PASSWORD, safe='')}@db/x")
    result = run_in_process(project, capsys, "config.validate", "--env=staging")
    assert result.returncode == 10
    assert "configuration has 3 problems" in result.stderr
    assert_clean(result)


def test_config_validate_exits_10_for_broken_yaml(project: Project, capsys) -> None:
    project.write_config("app: [\n")
    result = run_in_process(project, capsys, "config.validate", "--env=staging")
    assert result.returncode == 10
    assert "invalid YAML" in result.stderr
    assert_clean(result)


def test_missing_env_exits_2(real_cli) -> None:
    result = real_cli["results"]["no env"]
    assert result.returncode == 2
    assert "--env is required" in result.stderr
    assert_clean(result)


@pytest.mark.parametrize("args", [["config.validate", "--env=q_a"], ["deploy"],
                                  ["deploy", "--env=../prod"], ["status"], ["history"],
                                  ["lock.status", "--env=Staging"], ["lock.acquire"],
                                  ["lock.release"], ["config.show"], ["hosts.trust"]])
def test_missing_or_unknown_env_exits_2(project: Project, capsys, args: list[str]) -> None:
    result = run_in_process(project, capsys, *args)
    assert result.returncode == 2
    assert "--env" in result.stderr or "unknown environment" in result.stderr
    assert_clean(result)


def test_config_show_redacts_every_secret(real_cli) -> None:
    result = real_cli["results"]["show"]
    assert result.returncode == 0, result.stderr
    assert "togather-test" in result.stdout
    assert_clean(result)


def test_config_show_json_redacts_every_secret(project: Project, capsys) -> None:
    result = run_in_process(project, capsys, "config.show", "--env=staging", "--json")
    assert result.returncode == 0, result.stderr
    assert_clean(result)
    document = json.loads(result.stdout)
    assert document["hosts"] == ["deploy@staging.example.com:2222"]
    assert document["secrets"]["ENVIRONMENT"] == "staging"
    assert {document["secrets"][k] for k in ("DATABASE_URL", "JWT_SECRET",
                                             "ADMIN_API_KEY")} == {"***"}


def test_config_show_lists_every_secret_name(project: Project, capsys) -> None:
    result = run_in_process(project, capsys, "config.show", "--env=staging")
    for key in ("ADMIN_API_KEY", "DATABASE_URL", "ENVIRONMENT", "JWT_SECRET"):
        assert f"{key}:" in result.stdout


def test_config_show_of_a_bad_config_exits_10(project: Project, capsys) -> None:
    project.env_path("staging").unlink()
    result = run_in_process(project, capsys, "config.show", "--env=staging")
    assert result.returncode == 10
    assert ".env.staging" in result.stderr
    assert_clean(result)


def test_lock_commands_on_the_local_host(project: Project, capsys, tmp_path: Path) -> None:
    """development runs on `local`: the lock lives in a state file in remote_dir, no SSH."""
    remote_dir = tmp_path / "srv" / "development"
    project.write_config(BASE_CONFIG + f"  development:\n    remote_dir: {remote_dir}\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = run_in_process(project, capsys, *args, "--env=development")
        assert_clean(result)
        return result

    first = run("lock.acquire", "--message=maintenance")
    assert first.returncode == 0, first.stderr
    second = run("lock.acquire", "--message=again")
    assert second.returncode == 3
    assert "locked by" in second.stderr and "maintenance" in second.stderr
    status = run("lock.status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["message"] == "maintenance"
    released = run("lock.release")
    assert released.returncode == 0, released.stderr
    assert json.loads(run("lock.status", "--json").stdout) == {"locked": False}
    assert (remote_dir / "deployment-state.json").is_file()


# --- Invoke's core flags: -R/--dry and -d/--debug (issue 8, item 19) ------------------------

# What each task does under `inv -R`: its own dry run, a refusal, or simply run (read-only).
DRY_RUN_TASKS = {"deploy", "rollback", "cleanup", "hosts.setup"}
REFUSED_UNDER_DRY = {"lock.acquire", "lock.release", "db.snapshot", "db.restore", "hosts.trust",
                     "exec", "certs.renew", "maintenance.on", "maintenance.off"}
READ_ONLY_TASKS = {"status", "history", "health", "lock.status", "config.validate",
                   "config.show", "db.snapshots", "logs", "audit", "certs.show"}
# Reads nothing and changes nothing. (init, refused under -R too, takes no --env: tested alone.)
INERT_TASKS = {"version"}


def test_every_task_has_a_meaning_under_invoke_dry() -> None:
    """A new task must be put in one of the three sets (and given a decorator if it changes
    anything), or `inv -R NEW-TASK` would silently run for real."""
    assert set(namespace().task_names) == (DRY_RUN_TASKS | REFUSED_UNDER_DRY | READ_ONLY_TASKS
                                           | INERT_TASKS | {"init"})

def test_invoke_dry_refuses_init(tmp_path: Path, project: Project, capsys) -> None:
    target = tmp_path / "new-app"
    target.mkdir()
    result = run_in_process(project, capsys, "-R", "init", f"--path={target}")
    assert result.returncode == 2
    assert "init has no dry run" in result.stderr
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("name", sorted(REFUSED_UNDER_DRY))
@pytest.mark.parametrize("dry_flag", ["-R", "--dry"])
def test_invoke_dry_refuses_a_task_without_a_dry_run(project: Project, capsys, name: str,
                                                     dry_flag: str) -> None:
    """Refused before anything else: without -R these would go on to contact the host."""
    result = run_in_process(project, capsys, dry_flag, name, "--env=staging")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {name} has no dry run and -R/--dry does not "
                                     "rehearse it; nothing was changed")
    assert_clean(result)


@pytest.mark.parametrize("name", sorted(DRY_RUN_TASKS | READ_ONLY_TASKS))
def test_invoke_dry_lets_other_tasks_run(project: Project, capsys, name: str) -> None:
    """They get as far as their own argument check (no --env given): -R did not stop them."""
    result = run_in_process(project, capsys, "-R", name)
    assert result.returncode == 2
    assert "--env is required" in result.stderr
    assert_clean(result)


def test_invoke_dry_turns_on_the_tasks_dry_run() -> None:
    from invoke import Config, Context

    from togather_tasks.cli import dry_under_invoke_dry

    @dry_under_invoke_dry
    def body(c, env=None, dry_run=False):
        return dry_run

    dry = Context(Config(overrides={"run": {"dry": True}}))
    assert body(dry, "staging") is True
    assert body(dry, "staging", False) is True
    assert body(Context(), "staging") is False
    assert body(Context(), dry_run=True) is True


@pytest.mark.parametrize("name", sorted(DRY_RUN_TASKS))
def test_tasks_with_a_dry_run_follow_invoke_dry(name: str) -> None:
    from togather_tasks.cli import dry_under_invoke_dry

    assert namespace()[name].body.__code__ is dry_under_invoke_dry(lambda c: c).__code__


def test_invoke_debug_turns_on_the_tools_debug_output(project: Project, capsys,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`inv -d` shows every host command like TOGATHER_DEBUG=1 (development runs on `local`)."""
    monkeypatch.delenv("TOGATHER_DEBUG", raising=False)
    # Invoke's own -d logging would stay on (root logger at DEBUG) for the rest of the session.
    monkeypatch.setattr("invoke.program.enable_logging", lambda: None)
    project.write_config(BASE_CONFIG + f"  development:\n    remote_dir: {tmp_path / 'srv'}\n")
    plain = run_in_process(project, capsys, "lock.status", "--env=development")
    debug = run_in_process(project, capsys, "-d", "lock.status", "--env=development")
    after_task = run_in_process(project, capsys, "lock.status", "--env=development", "--debug")
    assert plain.returncode == debug.returncode == after_task.returncode == 0, debug.stderr
    assert "debug: [local] $ " not in plain.stderr
    assert "debug: [local] $ " in debug.stderr
    assert "debug: [local] $ " in after_task.stderr
    assert_clean(debug)


def test_short_d_after_a_task_is_refused_not_a_real_deploy(project: Project, capsys) -> None:
    """`-d` meant --dry-run before; after a task name Invoke would read it as --debug and
    deploy for real. Refused before anything runs."""
    result = run_in_process(project, capsys, "deploy", "-e", "staging", "-d", "--yes")
    assert result.returncode == 2
    assert result.stderr.startswith("error: -d after a task name is ambiguous")
    assert "-n/--dry-run" in result.stderr
    assert_clean(result)


# --- short flags, INT options, namespace help (issue 8, item 20) ----------------------------


def test_short_flags_are_the_deliberate_ones_with_one_meaning_each() -> None:
    ns = namespace()
    meaning: dict[str, set[str]] = {}
    for name in ns.task_names:
        for arg in ns[name].get_arguments():
            for short in (n for n in arg.names if len(n) == 1):
                meaning.setdefault(short, set()).add(arg.name)
    assert meaning == {"e": {"env"}, "y": {"yes"}, "n": {"dry_run"}, "j": {"json_"}}


@pytest.mark.parametrize(("name", "option"), [("history", "limit"), ("cleanup", "keep_images"),
                                              ("cleanup", "keep_snapshots")])
def test_numeric_options_are_int(name: str, option: str) -> None:
    arg = next(a for a in namespace()[name].get_arguments() if a.name == option)
    assert arg.kind is int


def test_an_unset_keep_option_still_means_the_configured_value() -> None:
    arguments = {a.name: a for a in namespace()["cleanup"].get_arguments()}
    assert arguments["keep_images"].default is None
    assert arguments["keep_snapshots"].default is None


@pytest.mark.parametrize(("args", "message"), [
    (["history", "--env=staging", "--limit=ten"], "error: --limit takes a whole number, "
                                                  "not 'ten'"),
    (["history", "--env=staging", "--limit", "1.5"], "error: --limit takes a whole number, "
                                                     "not '1.5'"),
    (["cleanup", "--env=staging", "--keep-images=x"], "error: --keep-images takes a whole "
                                                      "number, not 'x'"),
    (["cleanup", "-e", "staging", "-n", "--keep-snapshots", "two"],
     "error: --keep-snapshots takes a whole number, not 'two'"),
])
def test_a_non_number_for_an_int_option_exits_2(project: Project, capsys, args: list[str],
                                                message: str) -> None:
    result = run_in_process(project, capsys, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert_clean(result)


def test_short_flags_parse(project: Project, capsys) -> None:
    result = run_in_process(project, capsys, "config.show", "-e", "staging", "-j")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["secrets"]["ENVIRONMENT"] == "staging"


def test_list_shows_namespace_help(project: Project, capsys) -> None:
    result = run_in_process(project, capsys, "--list", "--list-depth=1")
    assert result.returncode == 0
    lines = {line.split("]")[0].split()[0]: line for line in result.stdout.splitlines()
             if "tasks]" in line}
    assert set(lines) == {"certs", "config", "db", "hosts", "lock", "maintenance"}
    assert all(len(line.split("]", 1)[1].strip()) > 10 for line in lines.values())


def test_version_names_the_package_invoke_and_fabric(project: Project, capsys) -> None:
    from togather_tasks import __version__
    result = run_in_process(project, capsys, "version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"togather-tasks {__version__} (invoke ")
    versions = json.loads(run_in_process(project, capsys, "version", "--json").stdout)
    assert versions["togather_tasks"] == __version__ and "fabric" in versions


@pytest.mark.parametrize("args, problem", [
    (["logs", "--slot=purple"], "--slot must be one of active, blue, green, proxy"),
    (["logs", "--lines=0"], "--lines must be at least 1"),
    (["logs", "--since=soon"], "--since takes a duration"),
    (["exec", "--slot=old", "--command=ls"], "--slot must be new"),
    (["exec"], "--command is required"),
    (["audit", "--lines=0"], "--lines must be at least 1"),
    (["deploy", "--lock-wait=-1"], "--lock-wait takes seconds"),
    (["lock.acquire", "--message=m", "--lock-wait=99999999"], "--lock-wait takes seconds"),
])
def test_everyday_commands_refuse_bad_arguments_before_any_host_contact(
        project: Project, capsys, args: list[str], problem: str) -> None:
    """The staging host of the test project does not exist: reaching it would fail otherwise."""
    result = run_in_process(project, capsys, *args, "--env=staging")
    assert result.returncode == 2, result.stderr
    assert problem in result.stderr
    assert_clean(result)
