"""Durable state for ``--state-file FILE``: a snapshot plus an append-only log.

Files: ``FILE`` is the latest snapshot, ``FILE.log.<gen>`` the log of changes since the
snapshot of generation ``gen``. Every write is acknowledged only after its log record is
fsynced; records that arrive while one fsync runs share the next (group commit), so the
cost is one fsync per batch, not per update.

Formats (all integers big-endian):
- snapshot: b"USPNSNAP" | u32 format | u64 gen | u32 length | u32 crc32 | msgpack(dump)
- log: b"USPNLOG1" | u64 gen, then records u32 length | u32 crc32 | msgpack(record)

A record whose length runs past the end or whose CRC fails ends the log: it is a torn
write (a crash mid-append), never read as valid, and everything after it is ignored (it
was never acknowledged, since acknowledgement follows the fsync of the whole batch).

Compaction writes the store's dump as snapshot gen+1 (temp file, fsync, rename, fsync of
the directory), then starts log gen+1 and removes the older logs. Loading reads the
snapshot, replays the logs of its generation or later in order, drops what expired while
the service was down, and compacts at once, so a torn tail is never appended to. Replay is
idempotent (records carry absolute expiries), so a record both in a snapshot and in the
log does no harm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from uspan import atomicfile
from uspan.discovery.store import Store

log = logging.getLogger("uspan.discovery")

SNAP_MAGIC = b"USPNSNAP"
LOG_MAGIC = b"USPNLOG1"
FORMAT = 1
SNAP_HEADER = struct.Struct(">8sIQII")
LOG_HEADER = struct.Struct(">8sQ")
RECORD = struct.Struct(">II")
MAX_RECORD = 1 << 20


class StateError(Exception):
    """The state file cannot be read or written (not: a torn tail, which is expected)."""


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def frame_record(payload: bytes) -> bytes:
    return RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(data: bytes, offset: int) -> tuple[list[Any], int, bool]:
    """Records from ``offset``: (records, end of the valid prefix, True if a tail was torn)."""
    records: list[Any] = []
    while offset < len(data):
        if offset + RECORD.size > len(data):
            return records, offset, True
        length, crc = RECORD.unpack_from(data, offset)
        start, end = offset + RECORD.size, offset + RECORD.size + length
        if length > MAX_RECORD or end > len(data) or zlib.crc32(data[start:end]) != crc:
            return records, offset, True
        try:
            records.append(msgpack.unpackb(data[start:end], raw=False, strict_map_key=False))
        except (ValueError, TypeError) as e:  # a CRC-valid record we cannot read: stop too
            log.warning("state log record at %d unreadable (%s)", offset, type(e).__name__)
            return records, offset, True
        offset = end
    return records, offset, False


def apply_record(store: Store, record: list[Any]) -> None:
    """Replay one log record (see ``Journal`` users for how they are written)."""
    kind = record[0]
    if kind == "u":
        _, cluster, key, pin_until, affiliate, data, endpoints, expires, now = record
        store.pin(cluster, key, pin_until)
        store.apply_update(cluster, affiliate, data, tuple(endpoints), expires, now)
    elif kind == "d":
        store.delete(record[1], record[2])
    elif kind == "p":
        store.pin(record[1], record[2], record[3])
    else:
        raise StateError(f"unknown log record kind {kind!r}")


class StateFile:
    """The files of one ``--state-file``; blocking calls, run them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = path.parent
        self.gen = 0
        self._log: Any = None  # the open log file of generation self.gen

    def _log_path(self, gen: int) -> Path:
        return self.path.with_name(f"{self.path.name}.log.{gen}")

    def _logs(self) -> list[tuple[int, Path]]:
        prefix = f"{self.path.name}.log."
        found = []
        for entry in self.dir.iterdir():
            if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit():
                found.append((int(entry.name[len(prefix) :]), entry))
        return sorted(found)

    def load(self, store: Store, now: float) -> dict[str, int]:
        """Fill an empty store from disk, drop what expired, compact. Returns counts."""
        stats = {"records": 0, "torn": 0, "expired": 0}
        gen = 0
        if self.path.exists():
            raw = self.path.read_bytes()
            if len(raw) < SNAP_HEADER.size:
                raise StateError(f"{self.path}: snapshot truncated")
            magic, fmt, gen, length, crc = SNAP_HEADER.unpack_from(raw)
            body = raw[SNAP_HEADER.size :]
            if magic != SNAP_MAGIC or fmt != FORMAT:
                raise StateError(f"{self.path}: not a uspan discovery snapshot")
            if len(body) != length or zlib.crc32(body) != crc:
                raise StateError(f"{self.path}: snapshot corrupt (it is written atomically)")
            store.load(msgpack.unpackb(body, raw=False, strict_map_key=False))
        for log_gen, log_path in self._logs():
            if log_gen < gen:
                continue
            data = log_path.read_bytes()
            if len(data) < LOG_HEADER.size or LOG_HEADER.unpack_from(data) != (LOG_MAGIC, log_gen):
                stats["torn"] += 1  # a log whose header never reached the disk holds nothing
                continue
            records, _, torn = read_records(data, LOG_HEADER.size)
            for record in records:
                apply_record(store, record)
            stats["records"] += len(records)
            stats["torn"] += torn
        self.gen = max([gen, *(g for g, _ in self._logs())])
        stats["expired"] = len(store.gc(now))
        self.compact(store.dump())
        return stats

    def compact(self, dump: list[Any]) -> None:
        """Snapshot gen+1 atomically, then a fresh log gen+1; older logs go."""
        gen = self.gen + 1
        body = pack(dump)
        header = SNAP_HEADER.pack(SNAP_MAGIC, FORMAT, gen, len(body), zlib.crc32(body))
        atomicfile.write(self.path, header + body)
        if self._log is not None:
            self._log.close()
        # 0600 as the snapshot (atomicfile), whatever the umask: both hold the clusters.
        fd = os.open(self._log_path(gen), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        self._log = os.fdopen(fd, "wb")  # kept open across calls
        self._log.write(LOG_HEADER.pack(LOG_MAGIC, gen))
        self._log.flush()
        os.fsync(self._log.fileno())
        atomicfile.fsync_directory(self.dir)
        self.gen = gen
        for old_gen, old in self._logs():
            if old_gen < gen:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def append(self, payloads: list[bytes]) -> None:
        """Write records and fsync them: after this returns they survive a crash."""
        assert self._log is not None, "load() first"
        self._log.write(b"".join(frame_record(p) for p in payloads))
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class _Batch:
    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.done = trio.Event()
        self.error: str | None = None


class Journal:
    """Group commit in trio: ``commit`` returns once its record is on disk."""

    def __init__(self, state: StateFile, dump: Callable[[], list[Any]]) -> None:
        self.state = state
        self._dump = dump
        self._batch = _Batch()
        self._wakeup = trio.Event()
        self._compact = False
        self.fsyncs = 0

    def add(self, record: list[Any]) -> _Batch:
        """Queue a record now (keeps the log in the order of the changes)."""
        self._batch.records.append(pack(record))
        self._wakeup.set()
        return self._batch

    async def commit(self, batch: _Batch) -> None:
        await batch.done.wait()
        if batch.error is not None:
            raise StateError(batch.error)

    def request_compaction(self) -> None:
        self._compact = True
        self._wakeup.set()

    async def run(self) -> None:
        """The writer task: one fsync per batch, and compactions between batches."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        batch, self._batch = self._batch, _Batch()
        if batch.records:
            try:
                await trio.to_thread.run_sync(self.state.append, batch.records)
                self.fsyncs += 1
            except OSError as e:
                batch.error = f"state file write failed: {e.strerror or e}"
                log.error("%s", batch.error)
        batch.done.set()
        if self._compact:
            self._compact = False
            dump = self._dump()  # consistent: taken in the trio thread, between changes
            try:
                await trio.to_thread.run_sync(self.state.compact, dump)
            except OSError as e:
                log.error("state file compaction failed: %s", e.strerror or e)
