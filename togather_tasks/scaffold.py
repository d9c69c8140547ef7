"""`inv init`: the files an application repository needs to adopt the tool, from the package's
templates (togather_tasks/templates). An existing file is never overwritten: the operator's
edits win, and the report says which files were kept. The .gitignore only gains the lines it
lacks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
ENVIRONMENTS = ("development", "staging", "production")
HOOK_SAMPLES = ("pre-deploy", "post-deploy", "on-failure")
GITIGNORE = Path(".gitignore")


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    gitignore_added: list[str] = field(default_factory=list)


def app_name(directory: Path) -> str:
    """The directory's name as the schema's app.name wants it (`My App` -> `my-app`)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", directory.name.lower()).strip("-_")[:63]
    return name or "app"


def render(template: str, **values: str) -> str:
    """`{{key}}` placeholders (not str.format: the YAML and shell text has braces of its own)."""
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def planned_files(root: Path) -> dict[Path, tuple[str, int]]:
    """Every file init writes: relative path -> (content, mode)."""
    name = app_name(root)
    db = name.replace("-", "_")
    files = {Path("config/deployment.yml"): (render("deployment.yml.tmpl", app_name=name),
                                             0o644),
             Path("tasks.py"): (render("tasks.py.tmpl"), 0o644)}
    for env in ENVIRONMENTS:
        files[Path(f"config/environments/.env.{env}.example")] = (
            render("env.example.tmpl", app_name=name, app_name_db=db, env=env,
                   env_db=env.replace("-", "_")), 0o644)
    for hook in HOOK_SAMPLES:
        files[Path(f"config/hooks/{hook}.sample")] = (render(f"{hook}.sample.tmpl"), 0o755)
    return files


def missing_gitignore_lines(existing: str) -> list[str]:
    present = {line.strip() for line in existing.splitlines()}
    return [line for line in render("gitignore.tmpl").splitlines() if line not in present]


def init(root: Path) -> Report:
    report = Report()
    for relative, (content, mode) in planned_files(root).items():
        path = root / relative
        if path.exists():
            report.kept.append(relative)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as out:  # "x": never clobber a file made meanwhile
            out.write(content)
        path.chmod(mode)
        report.written.append(relative)
    report.gitignore_added = _extend_gitignore(root / GITIGNORE)
    return report


def _extend_gitignore(path: Path) -> list[str]:
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    missing = missing_gitignore_lines(existing)
    if missing:
        separator = "" if not existing or existing.endswith("\n") else "\n"
        with path.open("a", encoding="utf-8") as out:
            out.write(separator + "# togather-tasks: real secrets files are never committed\n"
                      + "".join(f"{line}\n" for line in missing))
    return missing
