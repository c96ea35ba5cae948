"""Durable state: snapshot and log reload, torn tails, expiry while down, group commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from uspan.discovery.backend import MemoryBackend
from uspan.discovery.persist import LOG_HEADER, StateError, StateFile
from uspan.discovery.store import Store

KEY = b"k" * 32
T0 = 1_000_000.0


def logs(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".log.*"))


def run_backend(path: Path, now: float, actions: object) -> Store:
    """Start a MemoryBackend on ``path`` at ``now``, run ``actions(backend)``, stop it."""

    async def main() -> Store:
        backend = MemoryBackend(path, clock=lambda: now, gc_interval=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await actions(backend)  # type: ignore[operator]
            nursery.cancel_scope.cancel()
        return backend.store

    return trio.run(main)


async def nothing(backend: MemoryBackend) -> None:
    pass


def crash_copy(path: Path, into: Path) -> Path:
    """The files as a kill -9 would leave them (no shutdown compaction)."""
    into.mkdir()
    for f in [path, *logs(path)]:
        if f.exists():
            (into / f.name).write_bytes(f.read_bytes())
    return into / path.name


def test_acknowledged_updates_survive_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "state"
    copy: list[Path] = []

    async def act(backend: MemoryBackend) -> None:
        await backend.update("c", KEY, "a", b"one", (b"e1",), 60)
        await backend.update("c", KEY, "b", None, (b"e2",), 600)
        await backend.delete("c", KEY, "b")
        await backend.update("c", KEY, "a", None, (b"e3",), 60)
        copy.append(crash_copy(path, tmp_path / "crash"))

    run_backend(path, T0, act)
    store = run_backend(copy[0], T0 + 1, nothing)
    assert store.records("c") == [{"id": "a", "data": b"one", "endpoints": [b"e1", b"e3"]}]
    assert store.clusters["c"].pin == KEY


def test_clean_shutdown_compacts_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state"

    async def act(backend: MemoryBackend) -> None:
        for i in range(50):
            await backend.update("c", KEY, f"n{i}", b"d", (), 60)

    first = run_backend(path, T0, act)
    assert len(logs(path)) == 1 and logs(path)[0].stat().st_size == LOG_HEADER.size
    again = run_backend(path, T0 + 1, nothing)
    assert again.dump() == first.dump()


def test_entries_expired_while_down_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "state"

    async def act(backend: MemoryBackend) -> None:
        await backend.update("c", KEY, "short", b"d", (), 10)
        await backend.update("c", KEY, "long", b"d", (), 100)

    run_backend(path, T0, act)
    store = run_backend(path, T0 + 50, nothing)
    assert [r["id"] for r in store.records("c")] == ["long"]


@pytest.mark.parametrize("cut", [1, 3, 7, 9, 20])
def test_torn_tail_is_dropped_not_read(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "state"
    copy: list[Path] = []

    async def act(backend: MemoryBackend) -> None:
        await backend.update("c", KEY, "a", b"kept", (), 60)
        await backend.update("c", KEY, "b", b"torn", (), 60)
        copy.append(crash_copy(path, tmp_path / "crash"))

    run_backend(path, T0, act)
    (log,) = logs(copy[0])
    data = log.read_bytes()
    log.write_bytes(data[:-cut])  # the last record lost its last bytes
    store = run_backend(copy[0], T0 + 1, nothing)
    assert [r["id"] for r in store.records("c")] == ["a"]


def test_corrupt_record_ends_the_log(tmp_path: Path) -> None:
    path = tmp_path / "state"
    copy: list[Path] = []

    async def act(backend: MemoryBackend) -> None:
        await backend.update("c", KEY, "a", b"kept", (), 60)
        await backend.update("c", KEY, "b", b"flipped", (), 60)
        await backend.update("c", KEY, "c", b"after", (), 60)
        copy.append(crash_copy(path, tmp_path / "crash"))

    run_backend(path, T0, act)
    (log,) = logs(copy[0])
    data = bytearray(log.read_bytes())
    data[data.index(b"flipped")] ^= 1
    log.write_bytes(bytes(data))
    store = run_backend(copy[0], T0 + 1, nothing)
    assert [r["id"] for r in store.records("c")] == ["a"]


def test_corrupt_snapshot_is_an_error_not_silence(tmp_path: Path) -> None:
    path = tmp_path / "state"
    run_backend(path, T0, nothing)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StateError):
        StateFile(path).load(Store(), T0)


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    path = tmp_path / "state"
    fsyncs: list[int] = []

    async def act(backend: MemoryBackend) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(backend.update, "c", KEY, f"n{i}", b"d", (), 60)
        assert backend.journal is not None
        fsyncs.append(backend.journal.fsyncs)

    store = run_backend(path, T0, act)
    assert len(store.records("c")) == 200
    assert 1 <= fsyncs[0] < 50  # far fewer fsyncs than updates


def test_crash_between_snapshot_and_new_log(tmp_path: Path) -> None:
    """A snapshot newer than the only log: that log is covered, and ignored."""
    path = tmp_path / "state"

    async def act(backend: MemoryBackend) -> None:
        await backend.update("c", KEY, "a", b"d", (), 60)

    run_backend(path, T0, act)
    for log in logs(path):
        os.unlink(log)
    store = run_backend(path, T0 + 1, nothing)
    assert [r["id"] for r in store.records("c")] == ["a"]


def test_log_and_snapshot_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Both hold every cluster's affiliates: 0600 (the log was 0644 under umask 022)."""
    path = tmp_path / "discovery.state"

    async def act(backend: MemoryBackend) -> None:
        await backend.update("c", KEY, "a", b"d", (), 60)

    old = os.umask(0o022)
    try:
        run_backend(path, T0, act)
    finally:
        os.umask(old)
    assert [f.stat().st_mode & 0o777 for f in (path, *logs(path))] == [0o600, 0o600]
