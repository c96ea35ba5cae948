"""Stop signals (SIGINT, SIGTERM) that are never lost and never kill a process uncleanly.

A service manager may stop a program the instant it looks ready. Were the default action
in force until trio's handler is installed, a signal in that window would kill the
process and leave its socket files behind. So ``catch()`` runs first thing in ``main``
(before anything is created) and records stop signals instead; ``first()``, inside
trio, takes over from it and returns at once if one came early. A handler, not a
blocked mask: threads that libraries start at import (OpenBLAS's) would not inherit
the mask, and the kernel delivers a process signal to any thread that does not block it.
This module imports nothing heavy, so an entry point can ``catch()`` before it imports the
program (imports take a few hundred milliseconds on a busy machine; see
``uspan.launch``). Python's own start-up comes before any handler: ``uspan-wg`` and
``uspan`` are a compiled launcher (``uspan/launcher.c``) that blocks stop signals across
exec, and ``catch()`` unblocks them once its handler is in place, before any import
could start a thread; a ``uspan`` command that is no service gives them back
(``release()``). After ``first()`` the recording handler is back, so a second signal
during cleanup changes nothing: the process exits the way the first one asked.
"""

from __future__ import annotations

# The C module, loaded with the interpreter: ``signal`` first builds its enums, and
# ``typing`` costs milliseconds too, long enough at start-up for a SIGINT to land inside.
import _signal  # type: ignore[import-not-found]
from types import FrameType

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal

STOP_SIGNALS: tuple[int, int] = (_signal.SIGINT, _signal.SIGTERM)
_early: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)


def catch() -> None:
    """From now on, record stop signals for ``first()`` instead of dying of them; then
    unblock them, so one that came while they were blocked (by ``uspan-wg``'s launcher,
    before Python started) is recorded now."""
    for signum in STOP_SIGNALS:
        _signal.signal(signum, _record)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, STOP_SIGNALS)


def release() -> None:
    """For a command that is not a service after all: the default actions again (SIGINT
    raises KeyboardInterrupt, SIGTERM ends the process). One recorded since ``catch()``
    ends the process now, quietly, with the status a death by it gives (128 + N)."""
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    if _early:
        raise SystemExit(128 + _early[0])


async def first() -> signal.Signals:
    """The first stop signal, including one that arrived before trio was running."""
    import signal

    import trio  # here, not above: catch() must be importable before anything heavy

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if _early:
            return signal.Signals(_early[0])
        async for signum in signals:
            return signal.Signals(signum)
    raise AssertionError("unreachable: a signal receiver never ends")
