"""uspan.atomicfile: the old version or the new one, private, no temp file left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from uspan import atomicfile


def test_replaces_whole_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"old")
    atomicfile.write(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state"]


def test_a_failed_write_keeps_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomicfile.write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state"]
