"""Ctrl-C, SIGTERM and SIGHUP: raise `Interrupted` so every exit path runs its cleanup (lock
release), then shield that cleanup from a second signal. SIGHUP is what a dropped SSH session
to a jump box sends: it must not leave the lock and a half-started slot behind."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _install(handler: Any) -> dict[int, Any]:
    previous = {}
    for sig in SIGNALS:
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def interruptible() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def shielded() -> Iterator[None]:
    """While cleaning up (undo, lock release), a further Ctrl-C only prints a note: leaving a
    stuck lock behind would hurt the next operator more than a few seconds of waiting.
    In a worker thread (fleet.py) there is nothing to shield: signals reach only the main
    thread, which waits for its workers shielded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        print("still cleaning up (releasing the lock); this takes a few seconds",
              file=sys.stderr, flush=True)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Signals held back, not lost, while worker threads start (fleet.py): an Interrupted
    raised half-way through starting a thread would leave a thread its pool does not know
    about, which nobody would wait for before the failure path uses its host. A signal that
    came meanwhile is raised again on exit, for the handler in place before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = _install(lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        _restore(previous)
    if caught:
        signal.raise_signal(caught[0])
