"""Signals that end an operation: each raises Interrupted so the cleanup runs, and none of them
interrupts the cleanup itself."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from togather_tasks.errors import Interrupted
from togather_tasks.signals import deferred, interruptible, shielded

TERMINATING = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.fixture(autouse=True)
def outer_handlers() -> Iterator[list[int]]:
    """Handlers outside the operation that record instead of killing the test run, so a signal
    the code under test does not handle shows up as a failed assertion."""
    seen: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
                for sig in TERMINATING}
    yield seen
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", TERMINATING, ids=lambda s: s.name)
def test_a_terminating_signal_raises_interrupted(sig: signal.Signals,
                                                 outer_handlers: list[int]) -> None:
    with pytest.raises(Interrupted) as caught, interruptible():
        os.kill(os.getpid(), sig)
    assert caught.value.signame == sig.name
    assert outer_handlers == []


@pytest.mark.parametrize("sig", TERMINATING, ids=lambda s: s.name)
def test_cleanup_is_shielded_from_a_second_signal(sig: signal.Signals,
                                                  outer_handlers: list[int]) -> None:
    with interruptible(), shielded():
        os.kill(os.getpid(), sig)
    assert outer_handlers == []


def test_a_signal_while_workers_start_is_raised_once_they_have_started() -> None:
    started = []
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible(), deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        started.append("every worker")
    assert started == ["every worker"]
