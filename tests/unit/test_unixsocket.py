"""uspan.unixsocket: private from birth, stale files replaced, live ones refused."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from uspan import unixsocket


def test_private_listening_socket_and_stale_file_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a process that died: the file stays, nobody listens
    stale.close()
    live = unixsocket.listen(path, 0o077)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert unixsocket.answers(path)
        with pytest.raises(unixsocket.SocketInUse):
            unixsocket.listen(path, 0o077)
        assert unixsocket.answers(path)  # the live one is untouched
    finally:
        live.close()
    assert not unixsocket.answers(path)
