"""The entry points of ``uspan-wg`` and ``uspan``: stop signals are caught before the
program is imported.

Importing the program (trio, cryptography, ...) takes a few hundred milliseconds on a
busy machine; a SIGINT in that time would otherwise end it with a KeyboardInterrupt
traceback. The compiled ``uspan-wg`` and ``uspan`` (``launcher.c``, built by setup.py)
run these functions' console scripts, ``uspan-wg-python`` and ``uspan-python``, with
SIGINT and SIGTERM blocked, so Python's own start-up is covered too: ``catch()``
unblocks them with its handler in place, and one sent meanwhile stops the program as if
it came then. A ``uspan`` command that is not a service gives the default actions back
once it knows which it is (``uspan.cli``).
"""

from __future__ import annotations


def wg() -> int:
    """``uspan-wg``: the daemon."""
    from uspan import signals

    signals.catch()
    _name_process("uspan-wg")
    from uspan.daemon import cli

    return cli.main()


def uspan() -> int:
    """``uspan``: the node, the services, the lab and the tools."""
    from uspan import signals

    signals.catch()
    _name_process("uspan")
    from uspan import cli

    return cli.main()


def _name_process(name: str) -> None:
    """Be ``name`` in ps and ss, not ``python3``, as the program the user ran was."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        pass
