"""`inv init`: the files it writes, what it keeps, and that its config validates once the
hosts (and secrets) are filled in."""

from __future__ import annotations

from pathlib import Path

import pytest

from togather_tasks import scaffold
from togather_tasks.config import ConfigError, load_settings


def fill_in(root: Path, env: str) -> None:
    """What the operator does after init: hosts in deployment.yml, real secrets."""
    config = root / "config" / "deployment.yml"
    config.write_text(config.read_text().replace("hosts: []", "hosts: [deploy@app.example.com]"))
    example = root / "config" / "environments" / f".env.{env}.example"
    real = example.with_name(f".env.{env}")
    real.write_text(example.read_text().replace("CHANGE_ME", "s3cret-value-0123456789"))
    real.chmod(0o600)


def test_init_writes_every_file_with_the_directory_as_app_name(tmp_path: Path) -> None:
    root = tmp_path / "My Shop_API"
    root.mkdir()
    report = scaffold.init(root)
    assert {str(p) for p in report.written} == {
        "config/deployment.yml", "tasks.py",
        *(f"config/environments/.env.{e}.example" for e in scaffold.ENVIRONMENTS),
        *(f"config/hooks/{h}.sample" for h in scaffold.HOOK_SAMPLES)}
    assert report.kept == []
    assert "  name: my-shop_api " in (root / "config" / "deployment.yml").read_text()
    assert (root / "tasks.py").read_text().splitlines() == [
        "from togather_tasks import namespace", "ns = namespace(__file__)"]
    assert (root / "config" / "hooks" / "pre-deploy.sample").stat().st_mode & 0o111


@pytest.mark.parametrize("env", ["development", "staging", "production"])
def test_what_init_writes_validates_once_filled_in(tmp_path: Path, env: str) -> None:
    scaffold.init(tmp_path)
    if env != "development":
        with pytest.raises(ConfigError) as info:
            load_settings(env, tmp_path, require_secrets=False)
        assert f"environments.{env}.hosts" in "\n".join(info.value.problems)
    fill_in(tmp_path, env)
    settings = load_settings(env, tmp_path)
    assert settings.app_name == scaffold.app_name(tmp_path)


def test_the_example_env_file_is_refused_until_its_placeholders_are_replaced(
        tmp_path: Path) -> None:
    scaffold.init(tmp_path)
    fill_in(tmp_path, "staging")
    real = tmp_path / "config" / "environments" / ".env.staging"
    real.write_text((real.with_name(".env.staging.example")).read_text())
    with pytest.raises(ConfigError) as info:
        load_settings("staging", tmp_path)
    assert "CHANGE_ME" in "\n".join(info.value.problems)


def test_init_never_overwrites_and_says_what_it_kept(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "deployment.yml").write_text("mine\n")
    (tmp_path / "tasks.py").write_text("# mine\n")
    report = scaffold.init(tmp_path)
    assert [str(p) for p in report.kept] == ["config/deployment.yml", "tasks.py"]
    assert (tmp_path / "config" / "deployment.yml").read_text() == "mine\n"
    assert (tmp_path / "tasks.py").read_text() == "# mine\n"
    again = scaffold.init(tmp_path)
    assert again.written == [] and again.gitignore_added == []


def test_gitignore_gains_only_the_missing_lines(tmp_path: Path) -> None:
    (tmp_path / ".gitignore").write_text("node_modules/\nconfig/environments/.env.*")
    scaffold.init(tmp_path)
    lines = (tmp_path / ".gitignore").read_text().splitlines()
    assert lines[:2] == ["node_modules/", "config/environments/.env.*"]
    assert lines.count("config/environments/.env.*") == 1
    assert lines[-1] == "!config/environments/.env.*.example"


@pytest.mark.parametrize(("directory", "name"), [("shop", "shop"), ("My App", "my-app"),
                                                 ("--", "app"), ("Über.Service", "ber-service")])
def test_app_name_from_the_directory(directory: str, name: str) -> None:
    assert scaffold.app_name(Path("/src") / directory) == name
