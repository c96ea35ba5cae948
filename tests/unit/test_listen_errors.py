"""A service that cannot bind says where and for what: with ``--listen``, ``--metrics``
and ``--relay`` on one command line, the errno's text alone did not say which to fix."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uspan.discovery.procs import bound_pair, free_port

USPAN = str(Path(sys.executable).parent / "uspan")


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port held for TCP and UDP by this test."""
    tcp, udp = bound_pair()
    with tcp, udp:
        tcp.listen()
        yield tcp.getsockname()[1]


def error_of(*argv: str) -> str:
    done = subprocess.run([USPAN, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


@pytest.mark.parametrize(("argv", "what"), [
    (["discovery-service", "--listen", "127.0.0.1:{taken}", "--probe-port", "{free}"], "TCP"),
    (["discovery-service", "--listen", "127.0.0.1:{free}", "--metrics", "127.0.0.1:{taken}"],
     "metrics"),
    (["discovery-service", "--listen", "127.0.0.1:{free}", "--relay", "127.0.0.1:{taken}"],
     "relay, UDP"),
    (["relay", "--listen", "127.0.0.1:{taken}"], "relay, UDP"),
])
def test_a_failed_bind_names_its_address_and_purpose(taken: int, argv: list[str],
                                                     what: str) -> None:
    filled = [a.format(taken=taken, free=free_port()) for a in argv]
    line = error_of(*filled)
    assert f"cannot listen on 127.0.0.1:{taken} ({what}): Address already in use" in line
