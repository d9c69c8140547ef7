"""The application's git repository: resolve a ref to a commit and export that commit (never
the working tree, so uncommitted files are never deployed).

`root` is the app's source (config `app.source`): the top of a repository or a folder inside
one, whose commits are the repository's and whose files are read relative to the folder; or
the local copy of a remote repository (a git URL), refreshed by refresh()."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from .errors import UsageError

SAFE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@{}~^+-]{0,199}$")
REMOTE_CACHE = Path.home() / ".togather" / "sources"
FETCH_TIMEOUT = 600


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


def _tree_path(commit: str, path: str) -> str:
    """`COMMIT:./path`: relative to `root`, also when root is a folder inside the repository."""
    return f"{commit}:./{path.strip('/')}"


def has_path(root: Path, commit: str, path: str) -> bool:
    return _git(root, "cat-file", "-e", _tree_path(commit, path)).returncode == 0


def list_dir(root: Path, commit: str, path: str) -> list[str]:
    """File names directly under `path` in the commit (empty when there is no such folder)."""
    result = _git(root, "ls-tree", "--full-tree", "--name-only", _tree_path(commit, path))
    return result.stdout.splitlines() if result.returncode == 0 else []


def uncommitted_changes(root: Path) -> bool:
    """Changes to tracked files of the app's source (not of the rest of the repository)."""
    result = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return result.returncode == 0 and bool(result.stdout.strip())


def remote_cache(url: str) -> Path:
    """The local copy of a remote source: one per URL, kept between runs so a deploy fetches
    only what is new."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return REMOTE_CACHE / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def refresh(url: str | None) -> None:
    """For a git URL source (None: a local one, nothing to do), bring the remote's branches
    and tags into its local copy (branches under their own names, so `--ref=main` means the
    remote's main as of now). The copy has an empty work tree: `COMMIT:./path` needs one,
    and nothing is ever checked out into it."""
    if url is None:
        return
    cache = remote_cache(url)
    if not (cache / ".git").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        _git(cache, "init", "--quiet")
    result = _git(cache, "fetch", "--quiet", "--prune", "--force", "--update-head-ok", "--tags",
                  "--end-of-options", url, "+refs/heads/*:refs/heads/*",
                  timeout=FETCH_TIMEOUT)
    if result.returncode != 0:
        raise UsageError(f"cannot fetch the app's source {url}: "
                         f"{(result.stderr.strip().splitlines() or ['no output'])[-1][:200]}",
                         hint="Check app.source in config/deployment.yml and that this "
                              "machine can read the repository (git fetch).")


def archive(root: Path, commit: str) -> bytes:
    """`git archive` of the commit as an uncompressed tar."""
    result = _git(root, "archive", "--format=tar", commit, timeout=300, binary=True)
    if result.returncode != 0:
        raise UsageError(f"git archive of {commit[:7]} failed: "
                         f"{result.stderr.decode(errors='replace').strip()[:200]}")
    return result.stdout
