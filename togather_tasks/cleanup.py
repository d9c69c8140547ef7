"""Retention of images, releases and snapshots. Never removes the image of the current or the
previous deployment (the rollback target), nor the current deployment's snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import commands as cmd
from . import snapshots
from .config import Settings
from .errors import TogatherError
from .hosts import Host
from .session import Session
from .state import State


@dataclass
class CleanupReport:
    images: dict[str, list[str]] = field(default_factory=dict)
    releases: dict[str, list[str]] = field(default_factory=dict)
    snapshots: list[str] = field(default_factory=list)
    kept_in_use: dict[str, list[str]] = field(default_factory=dict)


def protected_versions(state: State) -> set[str]:
    return {d["version"] for d in (state.current, state.previous) if d}


def images_to_remove(tags_newest_first: list[str], *, keep: int,
                     protected: set[str]) -> list[str]:
    """Tags beyond the newest `keep`, never a protected one (pure)."""
    removable = [t for t in tags_newest_first if t not in protected and t != "none"]
    budget = max(0, keep - len(protected))
    return removable[budget:]


def run_cleanup(session: Session, *, keep_images: int, keep_snapshots: int,
                dry_run: bool) -> CleanupReport:
    state = session.store.read().state
    report = CleanupReport()
    for host in session.all_hosts:
        prune_host(session.settings, host, report, keep_images=keep_images,
                   protected=protected_versions(state), dry_run=dry_run)
    report.snapshots = [s.name for s in snapshots.prune(session, state, keep=keep_snapshots,
                                                        dry_run=dry_run)]
    return report


def prune_after_deploy(session: Session, state: State) -> CleanupReport:
    """After a successful deploy, under its lock: `prune_host_after_deploy` on every host,
    one after another (the deploy itself runs it on all hosts at once, during the drain)."""
    report = CleanupReport()
    for host in session.all_hosts:
        prune_host_after_deploy(session, state, host, report)
    log_pruned(session, report)
    return report


def prune_host_after_deploy(session: Session, state: State, host: Host,
                            report: CleanupReport) -> None:
    """One host's images and release directories beyond deployment.keep_images (never the
    current or previous deployment's), recorded in `report`. Snapshots are left to
    `inv cleanup` and their own retention. Never fails the deploy, which has happened: a
    problem is a warning, and the next deploy or `inv cleanup` tries again. Safe while the old
    slot drains: its image is the previous deployment's."""
    keep = int(session.settings.deployment["keep_images"])
    # Only tags this environment deployed itself: another environment or app sharing the
    # image name on this engine may be about to start a tag it just built (not yet used by a
    # container, so docker would not refuse to remove it).
    own = {d["version"] for d in state.known_deployments()}
    try:
        prune_host(session.settings, host, report, keep_images=keep,
                   protected=protected_versions(state), dry_run=False, only=own)
    except (TogatherError, OSError) as exc:
        session.console.warn(f"{host.name}: could not prune old images ({exc}); "
                             f"`inv cleanup --env={session.settings.env}` retries")


def log_pruned(session: Session, report: CleanupReport) -> None:
    session.log.event("pruned", images=report.images, releases=report.releases,
                      kept_in_use=report.kept_in_use)


def prune_host(st: Settings, host: Host, report: CleanupReport, *, keep_images: int,
               protected: set[str], dry_run: bool, only: set[str] | None = None) -> None:
    """One host's images beyond the newest `keep_images` (among the tags in `only`, when
    given) and their release directories, recorded in `report`. An image a container still
    uses is kept (docker refuses)."""
    layout = cmd.Layout(st.remote_dir)
    listing = host.run(cmd.image_tags(st.image), timeout=60,
                       what="listing images").stdout.split()
    candidates = [t for t in listing if only is None or t in only]
    doomed = images_to_remove(candidates, keep=keep_images, protected=protected)
    removed, in_use = [], []
    for tag in doomed:
        ref = f"{st.image}:{tag}"
        if dry_run:
            removed.append(ref)
            continue
        result = host.run(cmd.remove_image(ref), timeout=120, check=False)
        (removed if result.ok else in_use).append(ref)
    report.images[host.name] = removed
    report.kept_in_use[host.name] = in_use
    kept_tags = set(listing) - {r.rsplit(":", 1)[1] for r in removed}
    releases = host.run(cmd.list_dir(layout.releases), timeout=60).stdout.split()
    old_releases = [r for r in releases if r not in kept_tags and r not in protected
                    and not r.startswith(".")]
    if old_releases and not dry_run:
        host.run(cmd.remove_trees(*(layout.release(r) for r in old_releases)),
                 timeout=300, what="removing old releases")
    report.releases[host.name] = old_releases
