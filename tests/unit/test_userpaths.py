"""Per-user default paths and the private directories made for them (uspan.userpaths)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from uspan import privilege, userpaths


def test_private_dir_makes_every_new_level_0700(tmp_path: Path) -> None:
    os.umask(0o022)
    made = userpaths.private_dir(tmp_path / "a" / "b" / "c")
    for level in (made, made.parent, made.parent.parent):
        assert stat.S_IMODE(level.stat().st_mode) == 0o700


def test_private_dir_refuses_a_directory_of_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of another user")
    squatted = tmp_path / "uspan-1000"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)  # made by someone else, as in a shared /tmp
    with pytest.raises(userpaths.UserPathError, match="not a directory of user"):
        userpaths.private_dir(squatted / "wireguard")


def test_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError):
        userpaths.private_dir(tmp_path / "f")


def test_environment_chooses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(userpaths.UAPI_DIR_ENV, str(tmp_path / "w"))
    monkeypatch.setenv(userpaths.LAB_ROOT_ENV, str(tmp_path / "labs"))
    assert userpaths.uapi_dir() == str(tmp_path / "w")
    assert userpaths.lab_root() == tmp_path / "labs"


def test_root_keeps_the_system_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(userpaths.UAPI_DIR_ENV, raising=False)
    monkeypatch.delenv(userpaths.LAB_ROOT_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert userpaths.uapi_dir() == "/var/run/wireguard"
    assert userpaths.state_dir() == Path("/var/lib/uspan")
    assert userpaths.lab_root() == Path("/var/lib/uspan/labs")


def test_other_users_get_their_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (userpaths.UAPI_DIR_ENV, userpaths.LAB_ROOT_ENV, "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert userpaths.uapi_dir() == "/run/user/1000/wireguard"
    assert userpaths.state_dir() == tmp_path / ".local" / "state" / "uspan"
    assert userpaths.lab_root() == tmp_path / ".local" / "state" / "uspan" / "labs"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.setattr(userpaths, "SESSION_RUNTIME_DIR", str(tmp_path / "none-{uid}"))
    assert userpaths.uapi_dir() == "/tmp/uspan-1000/wireguard"
    assert userpaths.state_dir() == Path("/tmp/uspan-1000/state")


def test_hints_name_the_privilege_and_its_grant() -> None:
    assert "CAP_NET_ADMIN" in privilege.tun_hint(1) and "ip tuntap add" in privilege.tun_hint(1)
    assert "--device /dev/net/tun" in privilege.tun_hint(2)
    assert "--state-dir" in privilege.dir_hint(13, "/x", "--state-dir")
    assert privilege.tun_hint(22) == "" and privilege.with_hint("m", "") == "m"


def test_without_xdg_runtime_dir_the_sessions_own_directory_is_found(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A daemon started with a reset environment (no XDG_RUNTIME_DIR) and the user's
    login shell (which has it) must agree on the UAPI directory: the session's own
    /run/user/UID is used when it is there and safely the user's."""
    for name in (userpaths.UAPI_DIR_ENV, "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    uid = os.geteuid()
    monkeypatch.setattr(userpaths, "SESSION_RUNTIME_DIR", str(tmp_path / "user-{uid}"))
    session = tmp_path / f"user-{uid}"
    assert userpaths.runtime_dir() == Path(f"/tmp/uspan-{uid}")  # no session
    session.mkdir(mode=0o755)
    session.chmod(0o755)
    assert userpaths.runtime_dir() == Path(f"/tmp/uspan-{uid}")  # not private: not used
    session.chmod(0o700)
    assert userpaths.runtime_dir() == session
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # someone else's
    monkeypatch.setattr(userpaths, "SESSION_RUNTIME_DIR", str(session))
    assert userpaths.runtime_dir() == Path(f"/tmp/uspan-{uid + 1}")
