"""Local hooks: executables in the application repository's config/hooks/ named after the
moment they run at. They get TOGATHER_* variables describing the operation (never secrets).

A failing `pre-deploy` aborts before any change; a failing post-* or on-failure hook is reported
and never undoes anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import TogatherError
from .output import Console

HOOK_NAMES = ("pre-deploy", "post-switch", "post-deploy", "on-failure", "post-rollback")
HOOK_TIMEOUT = 300
OUTPUT_TAIL = 20


class HookFailed(TogatherError):
    """A blocking hook (pre-deploy) said no."""


def hook_path(root: Path, name: str) -> Path:
    return root / "config" / "hooks" / name


def hook_environment(values: dict[str, object]) -> dict[str, str]:
    """The operator's environment plus TOGATHER_<KEY> for each value (None dropped)."""
    env = dict(os.environ)
    for key, value in values.items():
        if value is not None:
            env[f"TOGATHER_{key.upper()}"] = str(value)
    return env


def run_hook(root: Path, name: str, values: dict[str, object], console: Console, *,
             blocking: bool = False) -> bool:
    """Run a hook if it exists. Returns True when it ran and succeeded (or does not exist)."""
    if name not in HOOK_NAMES:
        raise ValueError(f"unknown hook {name}")
    path = hook_path(root, name)
    if not path.exists():
        return True
    if not os.access(path, os.X_OK):
        message = f"hook {name} exists but is not executable (chmod +x {path})"
        if blocking:
            raise HookFailed(message, hint="Nothing was changed.")
        console.warn(message)
        return False
    try:
        proc = subprocess.run([str(path)], cwd=root, env=hook_environment(values),
                              capture_output=True, text=True, errors="replace",
                              timeout=HOOK_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
        output = (proc.stdout + proc.stderr).strip().splitlines()[-OUTPUT_TAIL:]
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        output, code = [], f"timeout after {HOOK_TIMEOUT} s"
    except OSError as exc:
        output, code = [], f"could not run: {exc.strerror}"
    for line in output:
        console.print(f"  hook {name}: {line}")
    if code == 0:
        return True
    message = f"hook {name} failed ({'exit ' + str(code) if isinstance(code, int) else code})"
    if blocking:
        raise HookFailed(message, hint="Nothing was changed: the deploy stopped before taking "
                                       "the lock.")
    console.warn(message + "; the operation itself is not undone")
    return False
