"""The ``uspan-wg`` entry point: stop signals are caught before the program is imported.

Importing the daemon (trio, cryptography, ...) takes a few hundred milliseconds on a busy
machine; a SIGINT in that time would otherwise end it with a KeyboardInterrupt traceback.
Only Python's own start-up (a few milliseconds) comes before ``catch()`` now.
"""

from __future__ import annotations


def main() -> int:
    from uspan import signals

    signals.catch()
    from uspan.daemon import cli

    return cli.main()
