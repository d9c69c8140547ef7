"""Invoke's own conventions on the real `inv` (issue 8, items 19 and 20): the core -R/--dry and
-d/--debug flags, short flags with one meaning each, INT options.

Before: `inv -R deploy` deployed for real, `-r` meant --ref in deploy and --restore-db in
rollback, and numeric options were STRING in `--help` (a non-number reached the task)."""

from __future__ import annotations

import re
import subprocess

import pytest

ERROR = "error: {task} has no dry run and -R/--dry does not rehearse it; nothing was changed"


def short_flags(help_text: str) -> dict[str, str]:
    """`-x, --long` pairs of an `inv --help TASK` output: short letter -> long option."""
    return dict(re.findall(r"^\s+-(\w)(?: \w+)?, --([\w-]+)", help_text, re.MULTILINE))


def test_invoke_dry_deploy_prints_the_plan_and_changes_nothing(demo_app) -> None:
    """`-d` too: the tool's debug lines (every host command) appear, still without secrets."""
    result = demo_app.inv("-d", "-R", "deploy", demo_app.env_flag, "--yes")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run: nothing was changed" in result.stdout
    assert "docker build" in result.stdout
    assert "debug: [" in result.stderr
    assert demo_app.tree() is None, "a dry run created the remote directory"
    assert demo_app.containers() == []
    assert demo_app.tables() == []
    demo_app.assert_no_secrets()


@pytest.mark.parametrize("args", [("lock.acquire", "--message=maintenance"),
                                  ("db.snapshot",), ("lock.release", "--force")])
def test_invoke_dry_refuses_a_task_that_changes_things(demo_app, cli_failure,
                                                       args: tuple[str, ...]) -> None:
    result = demo_app.inv("--dry", *args, demo_app.env_flag)

    line = cli_failure(result, contains=ERROR.format(task=args[0]), code=2)
    assert line == ERROR.format(task=args[0])
    assert demo_app.tree() is None, "a refused task created the remote directory"


def test_task_help_has_one_meaning_per_short_flag_and_int_options(demo_app) -> None:
    helps = {task: demo_app.inv("--help", task, check=True).stdout
             for task in ("deploy", "rollback", "cleanup", "history", "db.restore")}

    meanings: dict[str, set[str]] = {}
    for text in helps.values():
        for short, option in short_flags(text).items():
            meanings.setdefault(short, set()).add(option)
    assert meanings == {"e": {"env"}, "y": {"yes"}, "n": {"dry-run"}, "j": {"json"}}
    assert "--limit=INT" in helps["history"]
    assert "--keep-images=INT" in helps["cleanup"]
    assert "--keep-snapshots=INT" in helps["cleanup"]


def test_a_non_number_exits_2_before_any_host_contact(demo_app, cli_failure) -> None:
    result: subprocess.CompletedProcess = demo_app.inv("cleanup", demo_app.env_flag,
                                                       "--keep-images=all")

    cli_failure(result, contains="--keep-images takes a whole number, not 'all'", code=2)
    assert demo_app.tree() is None
