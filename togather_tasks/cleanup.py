"""Retention of images, releases and snapshots. Never removes the image of the current or the
previous deployment (the rollback target), nor the current deployment's snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import commands as cmd
from . import snapshots
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
    st = session.settings
    state = session.store.read().state
    protected = protected_versions(state)
    report = CleanupReport()
    layout = cmd.Layout(st.remote_dir)
    for host in session.all_hosts:
        listing = host.run(cmd.image_tags(st.image), timeout=60,
                           what="listing images").stdout.split()
        doomed = images_to_remove(listing, keep=keep_images, protected=protected)
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
    report.snapshots = [s.name for s in snapshots.prune(session, state, keep=keep_snapshots,
                                                        dry_run=dry_run)]
    return report
