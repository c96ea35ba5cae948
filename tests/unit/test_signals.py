"""uspan.signals: a stop signal before trio runs is kept, not fatal, and reported first."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
import trio

from uspan import signals as stop_signals


@pytest.fixture
def restore_handlers(default_stop_actions: None) -> Iterator[None]:
    yield
    stop_signals._early.clear()
    stop_signals._inherited.clear()


def test_signal_before_trio_is_returned_first(restore_handlers: None) -> None:
    stop_signals.catch()
    os.kill(os.getpid(), signal.SIGTERM)  # would kill the process without catch()
    os.kill(os.getpid(), signal.SIGINT)
    assert trio.run(stop_signals.first) is signal.SIGTERM


def test_signal_while_waiting_is_returned_and_later_ones_are_recorded(
        restore_handlers: None) -> None:
    stop_signals.catch()

    async def scenario() -> signal.Signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, os.kill, os.getpid(), signal.SIGINT)
            return await stop_signals.first()

    assert trio.run(scenario) is signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)  # during cleanup: recorded, not fatal
    assert stop_signals._early == [signal.SIGTERM]


def test_a_signal_blocked_before_catch_is_recorded_when_it_unblocks(
        restore_handlers: None) -> None:
    """uspan-wg's launcher blocks stop signals across exec: one sent during Python's
    start-up stays pending, and ``catch()`` must take it once its handler is in place."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals.STOP_SIGNALS)
    try:
        # To this thread: a process signal could go to a thread an earlier test left.
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        assert stop_signals._early == []  # pending, not delivered
        stop_signals.catch()
        assert stop_signals._early == [signal.SIGTERM]
        assert not set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(
            stop_signals.STOP_SIGNALS)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def test_release_gives_a_tool_the_default_actions_back(restore_handlers: None) -> None:
    stop_signals.catch()
    stop_signals.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_recorded_before_release_ends_the_tool_quietly(
        restore_handlers: None) -> None:
    stop_signals.catch()
    os.kill(os.getpid(), signal.SIGTERM)  # during the imports
    with pytest.raises(SystemExit) as ended:
        stop_signals.release()
    assert ended.value.code == 128 + signal.SIGTERM


def test_release_keeps_a_signal_the_tool_was_started_with_ignored(
        restore_handlers: None) -> None:
    """``uspan stats wg0 &`` from a script: SIGINT is ignored, and stays so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_signals.catch()
    os.kill(os.getpid(), signal.SIGINT)
    stop_signals.release()  # no SystemExit: the recorded one was to be ignored
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize(("service", "sigpipe"), [(True, signal.SIG_IGN),
                                                  (False, signal.SIG_DFL)])
def test_only_a_tool_dies_quietly_of_a_closed_pipe(
        restore_handlers: None, service: bool, sigpipe: signal.Handlers) -> None:
    """A tool in ``| head`` ends quietly; a service (``uspan run`` serves its UAPI in
    process) must get EPIPE from a client gone mid-reply, not be killed by SIGPIPE."""
    from uspan.cli import command_signals

    saved = signal.getsignal(signal.SIGPIPE)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own start
    try:
        stop_signals.catch()
        command_signals(service=service)
        assert signal.getsignal(signal.SIGPIPE) == sigpipe
    finally:
        signal.signal(signal.SIGPIPE, saved)
