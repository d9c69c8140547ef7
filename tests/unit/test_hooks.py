"""Local hooks: whatever a hook prints, the operation is not disturbed."""

from __future__ import annotations

import io
from pathlib import Path

from togather_tasks import hooks
from togather_tasks.output import Console
from togather_tasks.redact import Redactor


def write_hook(root: Path, name: str, script: str) -> None:
    path = hooks.hook_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_a_hook_printing_bytes_that_are_not_utf8_does_not_crash(tmp_path: Path) -> None:
    write_hook(tmp_path, "post-deploy", r"printf 'caf\351 \377done\n'")
    out = io.StringIO()

    assert hooks.run_hook(tmp_path, "post-deploy", {}, Console(Redactor(), stream=out))
    assert "done" in out.getvalue()


def test_a_failing_post_hook_is_a_warning(tmp_path: Path) -> None:
    write_hook(tmp_path, "post-deploy", "echo nope; exit 3\n")
    err = io.StringIO()

    assert not hooks.run_hook(tmp_path, "post-deploy", {},
                              Console(Redactor(), stream=io.StringIO(), err=err))
    assert "hook post-deploy failed (exit 3)" in err.getvalue()
