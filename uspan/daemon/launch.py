"""The ``uspan-wg`` entry point: stop signals are caught before the program is imported.

Importing the daemon (trio, cryptography, ...) takes a few hundred milliseconds on a busy
machine; a SIGINT in that time would otherwise end it with a KeyboardInterrupt traceback.
The compiled ``uspan-wg`` (``launcher.c``, built by setup.py) runs this module's console
script, ``uspan-wg-python``, with SIGINT and SIGTERM blocked, so Python's own start-up
is covered too: ``catch()`` unblocks them with its handler in place, and one sent
meanwhile stops the program as if it came then.
"""

from __future__ import annotations


def main() -> int:
    from uspan import signals

    signals.catch()
    _name_process()
    from uspan.daemon import cli

    return cli.main()


def _name_process() -> None:
    """Be ``uspan-wg`` in ps and ss, not ``python3``, as the script the kernel ran was."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("uspan-wg")
    except OSError:
        pass
