"""The application's git repository: resolve a ref to a commit and export that commit (never
the working tree, so uncommitted files are never deployed)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .errors import UsageError

SAFE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@{}~^+-]{0,199}$")


def _git(root: Path, *args: str, timeout: float = 60, binary: bool = False):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                          timeout=timeout, check=False, text=not binary)


def resolve_ref(root: Path, ref: str) -> str:
    """The full 40-character SHA of `ref`; a clear error for a ref that does not exist or is
    not a plausible ref at all (hostile strings never reach a shell: git runs without one)."""
    if not SAFE_REF.match(ref or "") or ".." in ref:
        raise UsageError(f"--ref {ref!r} is not a valid git ref",
                         hint="Use a branch, tag or commit SHA, e.g. --ref=main or --ref=abc1234.")
    try:
        result = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options",
                      f"{ref}^{{commit}}")
    except FileNotFoundError:
        raise UsageError("git is not installed on this machine") from None
    sha = result.stdout.strip() if result.returncode == 0 else ""
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        if _git(root, "rev-parse", "--git-dir").returncode != 0:
            raise UsageError(f"{root} is not a git repository",
                             hint="Deploys are built from commits: run inside your app's repo.")
        raise UsageError(f"git ref {ref!r} does not resolve to a commit in {root}",
                         hint="Check `git log --oneline` or fetch the ref first.")
    return sha


def has_path(root: Path, commit: str, path: str) -> bool:
    return _git(root, "cat-file", "-e", f"{commit}:{path.strip('/') or '.'}").returncode == 0


def list_dir(root: Path, commit: str, path: str) -> list[str]:
    """File names directly under `path` in the commit (empty when there is no such folder)."""
    result = _git(root, "ls-tree", "--name-only", f"{commit}:{path.strip('/') or '.'}")
    return result.stdout.splitlines() if result.returncode == 0 else []


def uncommitted_changes(root: Path) -> bool:
    result = _git(root, "status", "--porcelain", "--untracked-files=no")
    return result.returncode == 0 and bool(result.stdout.strip())


def archive(root: Path, commit: str) -> bytes:
    """`git archive` of the commit as an uncompressed tar."""
    result = _git(root, "archive", "--format=tar", commit, timeout=300, binary=True)
    if result.returncode != 0:
        raise UsageError(f"git archive of {commit[:7]} failed: "
                         f"{result.stderr.decode(errors='replace').strip()[:200]}")
    return result.stdout
