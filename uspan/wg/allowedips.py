"""Cryptokey routing: longest-prefix match of IPv4 and IPv6 addresses to a value (a peer).

Prefixes are plain ints (``uspan.wg.prefix``). Each (family, length) present has one
table from its prefixes to their values; a lookup probes these tables from the longest
length to the shortest, so it costs one dict probe per distinct prefix length present in
that family, whatever the number of prefixes. Values are compared by identity, as peers
are. Each owner also keeps its prefixes in insertion order (the same int objects as the
tables: a million prefixes cost two dict entries and one int each, and nothing the
garbage collector walks), so ``get=1`` lists them and a peer's removal finds them.
Every dict that grows with the prefixes stays under about SHARD_AT entries (tables in
shards, an owner's prefixes in segments): a dict resizes in one step, and a million
entries' resize held the tunnel for tens of milliseconds. An owner's text, once read,
is kept by segment until that segment changes: ``wg show`` in a loop, or many clients
polling, then costs no rendering."""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar, overload

from uspan.wg.config import Prefix
from uspan.wg.prefix import tag as prefix_tag
from uspan.wg.prefix import texts as prefix_texts

T = TypeVar("T")

SHARD_AT = 1 << 14  # entries a dict that grows with the prefixes may reach (~1 ms resize)
SHARD_SHIFT = 8  # prefixes that differ only below this bit share a routing shard
SHARD_START = 6  # bits of routing shard index of a new table (64 shards: 1M /32s unsplit)
SHARD_DEPTH = 16  # bits of routing shard index at most (65,536 directory entries)


class _Table(Generic[T]):
    """One (family, length)'s prefixes and their values, in shards of at most about
    SHARD_AT entries: a dict that grows past a few hundred thousand entries resizes in
    one step of tens of milliseconds, which no slicing can split. A shard that grows
    past SHARD_AT splits in two by the next bit of ``prefix >> SHARD_SHIFT``
    (extendible hashing); ``shards`` is the directory, indexed by the low bits of
    ``prefix >> SHARD_SHIFT`` (several entries name a shard that has not split as often),
    so a lookup costs one list index more than one dict. A table starts with
    2**SHARD_START shards, so a million prefixes spread evenly never split one (each
    split moves every entry of a shard once more). Runs of 2**SHARD_SHIFT neighbouring
    prefixes share a shard, so a batch of them is still one C-level update."""

    __slots__ = ("depths", "mask", "shards", "size")

    def __init__(self) -> None:
        self.shards: list[dict[Prefix, T]] = [{} for _ in range(1 << SHARD_START)]
        self.depths = [SHARD_START] * len(self.shards)  # bits each entry's shard is split by
        self.mask = len(self.shards) - 1
        self.size = 0

    def parts(self, group: Sequence[Prefix]) -> Iterator[tuple[dict[Prefix, T], Sequence[Prefix]]]:
        """The group by shard: whole when it is one run (or the table one shard)."""
        if not self.mask or min(group) >> SHARD_SHIFT == max(group) >> SHARD_SHIFT:
            yield self.shards[group[0] >> SHARD_SHIFT & self.mask], group
            return
        parts: dict[int, list[Prefix]] = {}
        for prefix in group:
            parts.setdefault(prefix >> SHARD_SHIFT & self.mask, []).append(prefix)
        shards = self.shards
        for index, part in parts.items():
            yield shards[index], part

    def renew(self, indices: Iterable[int]) -> None:
        """Replace the emptied shards at these directory entries by new dicts: a dict
        keeps its size when emptied, and the ~40 MB of a million-prefix table's shards
        freed in one step took 7 ms (the step that removed a peer's last prefixes)."""
        shards, depths = self.shards, self.depths
        for index in indices:
            if not shards[index]:
                depth = depths[index]
                fresh: dict[Prefix, T] = {}
                for entry in range(index & ((1 << depth) - 1), len(shards), 1 << depth):
                    shards[entry] = fresh

    def split(self, shard: dict[Prefix, T]) -> bool:
        """Split ``shard`` (and its halves) until each is at most SHARD_AT, or the
        directory is at its limit; return whether the directory grew."""
        grew = False
        pending = [shard]
        while pending:
            shard = pending.pop()
            if len(shard) <= SHARD_AT:
                continue
            index = next(iter(shard)) >> SHARD_SHIFT & self.mask
            if self.shards[index] is not shard:
                continue  # split already (a batch may name a shard twice)
            depth = self.depths[index]
            if depth == len(self.depths).bit_length() - 1:  # as split as the directory
                if depth == SHARD_DEPTH:
                    continue  # a pathological spread: this shard grows on
                self.shards += self.shards
                self.depths += self.depths
                self.mask = len(self.shards) - 1
                grew = True
            bit = 1 << (SHARD_SHIFT + depth)
            low = {prefix: value for prefix, value in shard.items() if not prefix & bit}
            high = {prefix: value for prefix, value in shard.items() if prefix & bit}
            base = index & ((1 << depth) - 1)
            for entry in range(base, len(self.shards), 1 << depth):
                self.shards[entry] = high if entry >> depth & 1 else low
                self.depths[entry] = depth + 1
            pending += (low, high)
        return grew


class _Ordered:
    """An owner's prefixes in insertion order: segments of at most SHARD_AT, the
    newest last, so neither appending a million nor removing them resizes a big dict.
    Only the newest segment is appended to; one emptied is dropped. Finding a prefix
    searches the segments oldest first (at most a few hundred probes of a dict).

    A snapshot (``get``) holds the segments themselves: one it may hold is copied
    before it changes (at most SHARD_AT entries), never all at once. A segment's text,
    once read whole, is kept with it until it changes: ``wg show`` in a loop renders
    nothing, and a change drops the text of the segments it touched only."""

    __slots__ = ("segments", "shared", "size", "texts")

    def __init__(self) -> None:
        self.segments: list[dict[Prefix, None]] = []
        self.size = 0
        self.shared: set[int] = set()  # ids of segments a snapshot may hold
        self.texts: dict[int, list[str]] = {}  # by id of a segment: its text

    def __iter__(self) -> Iterator[Prefix]:
        return itertools.chain.from_iterable(self.segments)

    def snapshot(self) -> list[dict[Prefix, None]]:
        self.shared.update(map(id, self.segments))
        return list(self.segments)

    def keep(self, segment: dict[Prefix, None], texts: list[str]) -> None:
        """Keep a snapshot's segment's text, if the segment is still unchanged."""
        if id(segment) in self.shared:
            self.texts[id(segment)] = texts

    def _writable(self, index: int) -> dict[Prefix, None]:
        segment = self.segments[index]
        self._forget(segment)
        if id(segment) in self.shared:
            self.shared.discard(id(segment))
            segment = self.segments[index] = dict(segment)
        return segment

    def _forget(self, segment: dict[Prefix, None]) -> None:
        self.texts.pop(id(segment), None)

    def _drop_empty(self) -> None:
        for segment in self.segments:
            if not segment:
                self.shared.discard(id(segment))
        self.segments = [segment for segment in self.segments if segment]

    def append(self, fresh: Sequence[Prefix]) -> None:
        """Add prefixes it does not hold at the end (one given twice, once)."""
        segments = self.segments
        if not segments or len(segments[-1]) + len(fresh) > SHARD_AT:
            fresh = list(dict.fromkeys(fresh))  # a repeat must not land in two segments
        start = 0
        while start < len(fresh):
            if not segments or len(segments[-1]) >= SHARD_AT:
                segments.append({})
            last = self._writable(-1)
            room, size = SHARD_AT - len(last), len(last)
            last.update(dict.fromkeys(fresh if not start and room >= len(fresh)
                                      else fresh[start:start + room]))
            self.size += len(last) - size
            start += room

    def delete(self, prefixes: Iterable[Prefix]) -> None:
        """Remove prefixes it holds, each once."""
        left = set(prefixes)
        self.size -= len(left)
        for index, segment in enumerate(self.segments):
            if not left:
                break
            found = segment.keys() & left
            if found:
                deque(map(self._writable(index).__delitem__, found), 0)
                left -= found
        self._drop_empty()

    def oldest(self, limit: int | None) -> list[Prefix]:
        """The first ``limit`` prefixes (None: all), removed."""
        taken: list[Prefix] = []
        segments = self.segments
        while segments and (limit is None or len(taken) < limit):
            segment = segments[0]
            part = list(segment if limit is None
                        else itertools.islice(segment, limit - len(taken)))
            if len(part) == len(segment):
                self._forget(segment)
                self.shared.discard(id(segment))
                del segments[0]
            else:
                deque(map(self._writable(0).__delitem__, part), 0)
            taken += part
        self.size -= len(taken)
        return taken


class _Owner(Generic[T]):
    __slots__ = ("prefixes", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.prefixes = _Ordered()


class AllowedIPs(Generic[T]):
    """Maps IP prefixes to values; every prefix has exactly one owner."""

    __slots__ = ("_owned", "_tables", "_v4", "_v6")

    def __init__(self) -> None:
        self._tables: dict[int, _Table[T]] = {}  # by prefix.tag
        # Per family, longest first: (host-bit shift, tag << width, the address's shift to
        # its shard index, shard mask, shards). The tag bits lie above any shard index
        # (SHARD_SHIFT + SHARD_DEPTH < 32), so the index needs only the address.
        self._v4: list[tuple[int, int, int, int, list[dict[Prefix, T]]]] = []
        self._v6: list[tuple[int, int, int, int, list[dict[Prefix, T]]]] = []
        self._owned: dict[int, _Owner[T]] = {}  # by id(value)

    def __len__(self) -> int:
        return sum(table.size for table in self._tables.values())

    def insert(self, prefixes: Sequence[Prefix], value: T) -> None:
        """Route each prefix to ``value``, taking it over from any previous owner."""
        if value is None:
            raise ValueError("allowed IPs need a value, not None")
        owner = self._owned.get(id(value))
        if owner is None:
            owner = self._owned[id(value)] = _Owner(value)
        tables = self._tables
        held: set[Prefix] = set()  # what value owned already: it keeps its place
        lost: dict[int, list[Prefix]] = {}  # what other values owned, by id(value)
        for tag, group in _by_tag(prefixes):
            table = tables.get(tag)
            if table is None:
                table = tables[tag] = _Table()
                self._reindex(tag & 1)
            full = []
            for shard, part in table.parts(group):
                # In C but for the prefixes some value held: they are rare.
                for taken in shard.keys() & part if shard else ():
                    previous = shard[taken]
                    if previous is value:
                        held.add(taken)
                    else:
                        lost.setdefault(id(previous), []).append(taken)
                size = len(shard)
                shard.update(dict.fromkeys(part, value))
                table.size += len(shard) - size
                if len(shard) > SHARD_AT:
                    full.append(shard)
            if any(list(map(table.split, full))):
                self._reindex(tag & 1)
        for key, gone in lost.items():
            self._disown(self._owned[key], gone)
        owner.prefixes.append([prefix for prefix in prefixes if prefix not in held]
                              if held else prefixes)
        if not owner.prefixes.size:
            del self._owned[id(value)]

    def remove(self, prefixes: Sequence[Prefix], value: T) -> int:
        """Remove each prefix that ``value`` owns; return how many it owned."""
        owner = self._owned.get(id(value))
        if owner is None:
            return 0
        mine: list[Prefix] = []
        for tag, group in _by_tag(list(dict.fromkeys(prefixes))):
            table = self._tables.get(tag)
            if table is None:
                continue
            shards, mask = table.shards, table.mask
            ours = [prefix for prefix in group
                    if shards[prefix >> SHARD_SHIFT & mask].get(prefix) is value]
            for prefix in ours:
                del shards[prefix >> SHARD_SHIFT & mask][prefix]
            table.renew({prefix >> SHARD_SHIFT & mask for prefix in ours})
            table.size -= len(ours)
            mine += ours
            if not table.size:
                del self._tables[tag]
                self._reindex(tag & 1)
        owner.prefixes.delete(mine)
        if not owner.prefixes.size:
            del self._owned[id(value)]
        return len(mine)

    def remove_value(self, value: T, limit: int | None = None) -> bool:
        """Remove the prefixes owned by ``value``, at most ``limit`` of them (oldest
        first; None: all); return whether it still owns any."""
        owner = self._owned.get(id(value))
        if owner is None:
            return False
        for tag, group in _by_tag(owner.prefixes.oldest(limit)):
            table = self._tables[tag]
            for shard, part in table.parts(group):
                deque(map(shard.__delitem__, part), 0)
                if not shard:
                    table.renew([part[0] >> SHARD_SHIFT & table.mask])
            table.size -= len(group)
            if not table.size:
                del self._tables[tag]
                self._reindex(tag & 1)
        if owner.prefixes.size:
            return True
        del self._owned[id(value)]
        return False

    def lookup(self, address: bytes) -> T | None:
        """Return the owner of the longest prefix holding a raw 4- or 16-byte address."""
        size = len(address)
        if size == 4:
            chain = self._v4
        elif size == 16:
            chain = self._v6
        else:
            return None
        number = int.from_bytes(address, "big")
        for shift, tag_bits, shard_shift, mask, shards in chain:
            value = shards[number >> shard_shift & mask].get(number >> shift | tag_bits)
            if value is not None:
                return value
        return None

    def prefixes(self, value: T) -> list[Prefix]:
        """The prefixes owned by ``value``, in the order they were given to it."""
        owner = self._owned.get(id(value))
        return [] if owner is None else list(owner.prefixes)

    def texts(self, value: T) -> Sequence[str]:
        """A snapshot of ``prefixes(value)`` as text (``10.0.0.0/8``, as ``get=1``
        reports them), rendered only as it is read (each segment's kept once read)."""
        owner = self._owned.get(id(value))
        return [] if owner is None else PrefixTexts(owner.prefixes)

    def _disown(self, owner: _Owner[T], prefixes: list[Prefix]) -> None:
        owner.prefixes.delete(prefixes)
        if not owner.prefixes.size:
            del self._owned[id(owner.value)]

    def _reindex(self, v6: int) -> None:
        width = 128 if v6 else 32
        chain = sorted(
            ((width - (tag >> 1), tag << width, width - (tag >> 1) + SHARD_SHIFT, table.mask,
              table.shards)
             for tag, table in self._tables.items() if tag & 1 == v6),
            key=lambda entry: entry[0],
        )
        if v6:
            self._v6 = chain
        else:
            self._v4 = chain


def _by_tag(prefixes: Sequence[Prefix]) -> Iterator[tuple[int, Sequence[Prefix]]]:
    """The prefixes in groups of one tag (one table): all of them at once when the
    smallest and the largest share a tag, as a run of /32s does (tags are monotonic in
    the prefix, so all between share it too); else tag by tag."""
    if not prefixes:
        return
    low, high = min(prefixes), max(prefixes)
    tag = prefix_tag(low)
    if tag == prefix_tag(high):
        yield tag, prefixes
        return
    groups: dict[int, list[Prefix]] = {}
    for prefix in prefixes:
        groups.setdefault(prefix_tag(prefix), []).append(prefix)
    yield from groups.items()


class PrefixTexts(Sequence[str]):
    """Prefixes as text, from a snapshot of an owner's segments: a ``get`` of a million
    prefixes renders each piece just before it is sent, not all of them at once. A
    segment read in order to its end gives its text to the owner to keep."""

    __slots__ = ("_at", "_keys", "_ordered", "_read", "_segments", "_starts")

    def __init__(self, ordered: _Ordered) -> None:
        self._ordered = ordered
        self._segments = ordered.snapshot()
        self._starts = list(itertools.accumulate(map(len, self._segments), initial=0))
        self._at = -1  # the segment being read in order
        self._keys: list[Prefix] = []  # its prefixes
        self._read: list[str] = []  # its text so far

    def __len__(self) -> int:
        return self._starts[-1]

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if not isinstance(index, slice):
            if not -len(self) <= index < len(self):
                raise IndexError("prefix index out of range")
            return self[index % len(self):index % len(self) + 1][0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            return [self[i] for i in range(start, stop, step)]
        out: list[str] = []
        while start < stop:
            number = bisect.bisect_right(self._starts, start) - 1
            base = self._starts[number]
            piece = self._texts(number, start - base, min(stop, self._starts[number + 1]) - base)
            out += piece
            start += len(piece)
        return out

    def _texts(self, number: int, low: int, high: int) -> list[str]:
        """The text of segment ``number``'s prefixes ``low:high``."""
        segment, ordered = self._segments[number], self._ordered
        kept = ordered.texts.get(id(segment)) if id(segment) in ordered.shared else None
        if kept is not None:
            return kept[low:high]
        if low == 0:  # read from its start: in order, its text may be kept
            self._at, self._keys, self._read = number, list(segment), []
        if self._at != number or low != len(self._read):
            return prefix_texts(list(itertools.islice(segment, low, high)))
        texts = prefix_texts(self._keys[low:high])
        self._read += texts
        if len(self._read) == len(segment):
            ordered.keep(segment, self._read)
            self._at, self._keys, self._read = -1, [], []
        return texts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PrefixTexts({list(self)!r})"
