"""`inv init` (issue 11) through the real command line: in an empty repository (with the
`togather` command, as there is no tasks.py yet), then `inv` in it; in one that already has a
config; and the written config validating once hosts and secrets are filled in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def cli(binary: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / binary), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_init_in_an_empty_repository_then_validate(tmp_path: Path) -> None:
    repo = tmp_path / "shop-api"
    repo.mkdir()
    result = cli("togather", repo, "init")
    assert result.returncode == 0, result.stderr
    assert "wrote config/deployment.yml" in result.stdout
    assert "wrote tasks.py" in result.stdout
    assert "name: shop-api" in (repo / "config" / "deployment.yml").read_text()

    # Before the hosts are filled in: exit 10, naming the key.
    staging = cli("inv", repo, "config.validate", "--env=staging")
    assert staging.returncode == 10
    assert "environments.staging.hosts" in staging.stderr
    assert "Traceback" not in staging.stdout + staging.stderr

    config = repo / "config" / "deployment.yml"
    config.write_text(config.read_text().replace("hosts: []", "hosts: [deploy@10.0.0.5]"))
    env_dir = repo / "config" / "environments"
    secrets = env_dir / ".env.staging"
    secrets.write_text((env_dir / ".env.staging.example").read_text()
                       .replace("CHANGE_ME", "a-long-random-value-0123"))
    secrets.chmod(0o600)
    valid = cli("inv", repo, "config.validate", "--env=staging")
    assert valid.returncode == 0, valid.stderr
    assert "staging: configuration is valid" in valid.stdout
    # Real secrets files are ignored by git, the examples are not.
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(secrets)], cwd=repo, check=False)
    example = subprocess.run(["git", "check-ignore", "-q", str(env_dir / ".env.staging.example")],
                             cwd=repo, check=False)
    assert (ignored.returncode, example.returncode) == (0, 1)


def test_init_where_a_config_exists_keeps_it_and_says_so(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    (repo / "config").mkdir(parents=True)
    (repo / "config" / "deployment.yml").write_text("app: {name: mine}\n")
    (repo / "tasks.py").write_text("from togather_tasks import namespace\n"
                                   "ns = namespace(__file__)\n")
    (repo / ".gitignore").write_text("*.log\n")
    result = cli("inv", repo, "init")
    assert result.returncode == 0, result.stderr
    assert "kept  config/deployment.yml (it exists; not overwritten)" in result.stdout
    assert "kept  tasks.py" in result.stdout
    assert "wrote config/environments/.env.staging.example" in result.stdout
    assert (repo / "config" / "deployment.yml").read_text() == "app: {name: mine}\n"
    assert (repo / ".gitignore").read_text().startswith("*.log\n")

    again = cli("inv", repo, "init", f"--path={repo}")
    assert again.returncode == 0
    assert "wrote" not in again.stdout and "added to .gitignore" not in again.stdout


def test_init_on_a_path_that_is_not_a_directory(tmp_path: Path) -> None:
    result = cli("togather", tmp_path, "init", f"--path={tmp_path / 'missing'}")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
