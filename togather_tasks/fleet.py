"""One action on every host of an environment at once, bounded by `deployment.parallel`.

A host's connection (hosts.RemoteHost) is never shared between threads: each host gets exactly
one task, so one worker runs a host's commands at a time. Signals reach only the main thread
(signals.py raises Interrupted there; workers start with them blocked). It waits in short
slices so an Interrupted propagates at once, and before it does, it tells the workers to give
up (`cancelled`) and waits for them, shielded: the failure path that follows may use each
host's connection again, and must know what each host did. A failure on one host cancels the
hosts still waiting (fail fast): the fleet's answer is already no.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import TogatherError
from .hosts import Host
from .signals import deferred, shielded

WAIT_SLICE = 0.1
T = TypeVar("T")


@dataclass(frozen=True)
class HostOutcome:
    """What one action did on one host. `ran` is False for a host that was cancelled before
    its turn: nothing happened there."""

    host: str
    seconds: float = 0.0
    value: Any = None
    error: BaseException | None = None
    ran: bool = True
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return self.ran and self.error is None

    def line(self) -> str:
        """`host1 ok 0.4s` / `host2 FAILED 3.1s` / `host3 skipped`."""
        if not self.ran:
            return f"{self.host} skipped"
        return f"{self.host} {'ok' if self.ok else 'FAILED'} {self.seconds:.1f}s"


Outcomes = dict[str, HostOutcome]


def waves(hosts: Sequence[T], batch: int | None) -> list[list[T]]:
    """The rolling deploy's waves: `batch` hosts each, in the environment's order (the last
    one may be smaller); without a batch, one wave of every host (all or none)."""
    size = batch or len(hosts) or 1
    return [list(hosts[i:i + size]) for i in range(0, len(hosts), size)]


def bound(parallel: int | None, hosts: int) -> int:
    """Workers for `hosts` hosts: `deployment.parallel`, default all of them."""
    return max(1, min(parallel or hosts, hosts))


def on_each(hosts: Sequence[Host], action: Callable[[Host], Any], *, parallel: int | None,
            into: Outcomes, cancelled: threading.Event | None = None,
            fail_fast: bool = True) -> Outcomes:
    """Run `action` on every host; each host's outcome lands in `into` (also when an
    Interrupted ends the wait, so an undo knows where the action ran). Returns `into`."""
    cancelled = cancelled or threading.Event()
    if len(hosts) == 1:
        _run_one(hosts[0], action, into)
        return into
    pool = ThreadPoolExecutor(max_workers=bound(parallel, len(hosts)),
                              thread_name_prefix="togather-host")
    try:
        # Inside the try: the first hosts may already run when a held-back signal arrives.
        with deferred():
            futures = [pool.submit(_run_one, host, action, into, cancelled, fail_fast)
                       for host in hosts]
        _wait_all(futures)
    except BaseException:
        cancelled.set()
        with shielded():
            pool.shutdown(wait=True, cancel_futures=True)
            _complete(hosts, into)
        raise
    pool.shutdown(wait=True)
    _complete(hosts, into)
    return into


def _run_one(host: Host, action: Callable[[Host], Any], into: Outcomes,
             cancelled: threading.Event | None = None, fail_fast: bool = True) -> None:
    """In a worker (`cancelled` given) every error is kept in `into` for the caller; inline
    (one host, no worker) it is raised as well, as if there were no fleet."""
    if cancelled is not None and cancelled.is_set():
        into[host.name] = HostOutcome(host.name, ran=False)
        return
    start = time.monotonic()
    try:
        value = action(host)
    except BaseException as exc:  # the caller decides; a worker must never lose it
        into[host.name] = HostOutcome(host.name, time.monotonic() - start, error=exc,
                                      finished=time.monotonic())
        if cancelled is None:
            raise
        if fail_fast:
            cancelled.set()
        return
    into[host.name] = HostOutcome(host.name, time.monotonic() - start, value,
                                  finished=time.monotonic())


def _wait_all(futures: list[Future[None]]) -> None:
    """In slices: a signal's Interrupted is raised here, in the main thread, at once."""
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=WAIT_SLICE)


def _complete(hosts: Sequence[Host], into: Outcomes) -> None:
    """Every host in `into`, in the environment's order (they finish in any order)."""
    ordered = {h.name: into.get(h.name) or HostOutcome(h.name, ran=False) for h in hosts}
    into.clear()
    into.update(ordered)


def first_failure(outcomes: Outcomes) -> HostOutcome | None:
    """The failure that came first: the others may only be its consequence (cancelled)."""
    failed = [o for o in outcomes.values() if o.ran and o.error is not None]
    return min(failed, key=lambda o: o.finished) if failed else None


def raise_first_failure(outcomes: Outcomes, *, fleet_size: int | None = None) -> None:
    """Raise the first host's error, its message naming the host when the fleet (of
    `fleet_size` hosts, default those in `outcomes`) has more than one (a bare "the slot did
    not become healthy" would not say where)."""
    failure = first_failure(outcomes)
    if failure is None:
        return
    exc = failure.error
    assert exc is not None
    if (fleet_size or len(outcomes)) > 1:
        name_host(exc, failure.host)
    raise exc


def name_host(exc: BaseException, host: str) -> None:
    """Prefix a TogatherError's message with `host` unless it names it already."""
    if isinstance(exc, TogatherError) and host not in exc.message:
        exc.message = f"{host}: {exc.message}"


def summary(outcomes: Outcomes) -> str:
    """`host1 ok 0.4s, host2 ok 0.5s`, in the environment's host order."""
    return ", ".join(o.line() for o in outcomes.values())
