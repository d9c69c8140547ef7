"""Issue 8 item 11: nothing a deploy leaves on the host is readable by another local user.

The secret files are created over SFTP with mode 600 in the open request itself (the unit tests
check the request; here the result), the remote directory and the parents the tool creates are
closed to others, and a remote directory left 0755 by an older version is closed by the next
deploy. The app still works behind it: the proxy (root in its container) reads the bind-mounted
upstream directory, the Docker daemon builds the release, pg_dump writes the snapshot.
"""

from __future__ import annotations

import pwd
import stat
import subprocess
from pathlib import Path

SECRET_FILES = ("app.env", ".pgpass")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *command], capture_output=True,
                          text=True, timeout=30, check=False)


def _assert_closed_to_others(app) -> None:
    root = Path(app.remote_dir)
    deploy_uid = pwd.getpwnam("deploy").pw_uid
    for directory in (root.parent, root, app.snapshot_dir):
        assert _mode(directory) & 0o007 == 0, f"{directory} has mode {_mode(directory):03o}"
    for name in SECRET_FILES:
        path = root / name
        assert (_mode(path), path.stat().st_uid) == (0o600, deploy_uid), (
            f"{name}: mode {_mode(path):03o}, owner uid {path.stat().st_uid}")
    refused = _as_nobody("cat", str(root / "compose.yml"))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused


def test_a_deploy_leaves_nothing_readable_by_other_local_users(demo_app):
    app = demo_app

    app.deploy(check=True)

    _assert_closed_to_others(app)
    assert app.served()[0] == "blue", "the proxy cannot read its upstream"
    assert app.snapshots(), "pg_dump wrote no snapshot"


def test_a_remote_directory_left_open_by_an_older_version_is_closed_by_the_next_deploy(
        demo_app):
    app = demo_app
    app.deploy(check=True)
    root = Path(app.remote_dir)
    root.chmod(0o755)

    app.commit("second version", {"app/NOTES.txt": "second\n"})
    app.deploy(check=True)

    assert _mode(root) == 0o750
    _assert_closed_to_others(app)
    assert app.served()[0] == "green"
