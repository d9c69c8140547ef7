"""Shared fixtures for the unit tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from togather_tasks.config import Settings

from .projects import COMPAT_DIR, Project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A valid project with staging and development secrets files."""
    p = Project(tmp_path / "app")
    p.write_config()
    p.write_env("staging")
    p.write_env("development")
    return p


@pytest.fixture
def settings(project: Project) -> Settings:
    return project.load("staging")


@pytest.fixture
def compat_schema() -> Callable[[str], dict]:
    """Loader for the original schemas in shared/compat (skips when the folder is absent)."""

    def load(name: str) -> dict:
        path = COMPAT_DIR / name
        if not path.is_file():
            pytest.skip(f"compatibility schema {path} not available")
        return json.loads(path.read_text())

    return load
