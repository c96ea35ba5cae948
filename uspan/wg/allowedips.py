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
entries' resize held the tunnel for tens of milliseconds. An owner's ``get=1`` lines,
once read as ``get=1`` reads them, are kept by segment (as the bytes sent) until that
segment changes: ``wg show`` in a loop, or many clients polling, then costs no rendering
and no joining of text."""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from operator import is_
from typing import Any, Generic, TypeVar, overload

from uspan.wg.config import Prefix
from uspan.wg.prefix import tag as prefix_tag
from uspan.wg.prefix import texts as prefix_texts

T = TypeVar("T")

SHARD_AT = 1 << 14  # entries a dict that grows with the prefixes may reach (~1 ms resize)
SHARD_SHIFT = 8  # prefixes that differ only below this bit share a routing shard
SHARD_START = 6  # bits of routing shard index of a new table (64 shards: 1M /32s unsplit)
SHARD_DEPTH = 16  # bits of routing shard index at most (65,536 directory entries)
SHARD_SPREAD = 65521  # a prime under 2**SHARD_DEPTH: the shard hash folds in every bit
SPLIT_STEP = 2048  # entries of a shard being split that one insert copies (~0.3 ms)
FEW_RUNS = 8  # runs of a sorted group that ``_Table.parts`` cuts by bisection
# Segments shorter than this render again at every get instead of keeping their lines:
# kept, the text of a peer's one prefix cost ~390 bytes (20,000 peers: 7.8 MB after one
# ``wg show``), to save rendering that costs about a microsecond a prefix.
KEEP_TEXT_AT = 256
LINE_HEAD = "allowed_ip="  # what starts each of ``get=1``'s lines of a prefix
_NEXT_LINE = "\n" + LINE_HEAD
# A peer with at most this many prefixes is rendered into a get's snapshot at once: one
# step of get_steps (device.INFO_STEP peers) then renders at most a get piece's worth.
RENDER_AT_ONCE = 16


class _Table(Generic[T]):
    """One (family, length)'s prefixes and their values, in shards of at most about
    SHARD_AT entries: a dict that grows past a few hundred thousand entries resizes in
    one step of tens of milliseconds, which no slicing can split. A prefix's shard hash
    is ``(prefix >> SHARD_SHIFT) % SHARD_SPREAD`` (the tag left out): a remainder by a
    prime folds in the high bits, so v6 prefixes that differ only far above their low
    bits (fd00:0:0:N::1/128) spread as v4 ones do. ``shards`` is the directory, indexed
    by the low bits of the hash (several entries name a shard that has not split as
    often: extendible hashing), so a lookup costs one remainder and one list index more
    than one dict. A table starts with 2**SHARD_START shards, so a million prefixes
    spread evenly never split one. Runs of 2**SHARD_SHIFT neighbouring prefixes share a
    shard, so a batch of them is still one C-level update."""

    __slots__ = ("depths", "host", "mask", "shards", "size", "splitting")

    def __init__(self, width: int) -> None:
        self.shards: list[dict[Prefix, T]] = [{} for _ in range(1 << SHARD_START)]
        self.depths = [SHARD_START] * len(self.shards)  # bits each entry's shard is split by
        self.mask = len(self.shards) - 1
        self.host = (1 << width) - 1  # the prefix without its tag
        self.size = 0
        self.splitting: _Split[T] | None = None

    def index(self, prefix: Prefix) -> int:
        """The directory entry of ``prefix``'s shard (as ``AllowedIPs.lookup`` finds it)."""
        return ((prefix & self.host) >> SHARD_SHIFT) % SHARD_SPREAD & self.mask

    def parts(self, group: Sequence[Prefix]) -> Iterator[tuple[dict[Prefix, T], Sequence[Prefix]]]:
        """The group by shard: whole when it is one run (or the table one shard). A
        sorted list of a few runs, as a slice of consecutive /32s not aligned to a run
        is, is cut at the runs' bounds (bisect, in C) rather than indexed a prefix at a
        time: that loop was ~20 % of the event loop's CPU in a set of 100k adds and
        100k removals."""
        low, high = min(group) >> SHARD_SHIFT, max(group) >> SHARD_SHIFT
        if not self.mask or low == high:
            yield self.shards[self.index(group[0])], group
            return
        parts: dict[int, list[Prefix]] = {}
        if high - low < FEW_RUNS and isinstance(group, list) and group == sorted(group):
            start = 0
            for run in range(low + 1, high + 2):  # high + 1: the rest
                cut = bisect.bisect_left(group, run << SHARD_SHIFT, start)
                if cut > start:
                    parts.setdefault(self.index(group[start]), []).extend(group[start:cut])
                start = cut
        else:
            for prefix in group:
                parts.setdefault(self.index(prefix), []).append(prefix)
        shards = self.shards
        for index, part in parts.items():
            yield shards[index], part

    def renew(self, indices: Iterable[int]) -> None:
        """Replace the emptied shards at these directory entries by new dicts: a dict
        keeps its size when emptied, and the ~40 MB of a million-prefix table's shards
        freed in one step took 7 ms (the step that removed a peer's last prefixes). An
        emptied shard's split in progress is dropped."""
        shards, depths = self.shards, self.depths
        for index in indices:
            if not shards[index]:
                if self.splitting is not None and self.splitting.shard is shards[index]:
                    self.splitting = None
                depth = depths[index]
                fresh: dict[Prefix, T] = {}
                for entry in range(index & ((1 << depth) - 1), len(shards), 1 << depth):
                    shards[entry] = fresh

    def split_step(self, full: dict[Prefix, T] | None) -> bool:
        """Go on with the split in progress, or start one of ``full`` (a shard past
        SHARD_AT) unless the directory is at its limit; return whether the directory
        grew. A shard is split once, by the next bit of its hash: one whose entries all
        share that bit stays whole and splits again as it grows (before, one insert split
        on until its halves fit: 16 splits, 122 ms for prefixes that share their low
        bits).

        A split copies its high half SPLIT_STEP entries a call (moving 8,000 of 16,000
        at once held the tunnel 3-5 ms) while the shard stays the one lookups read;
        changes to the shard meanwhile go to the copy too (``_Split.mirror``). Its last
        step points the directory's entries at the halves and deletes the copied half
        from the shard in C."""
        split = self.splitting
        if split is None:
            if full is None:
                return False
            index = self.index(next(iter(full)))
            depth = self.depths[index]
            if depth == SHARD_DEPTH and depth == len(self.depths).bit_length() - 1:
                return False  # a pathological spread: this shard grows on
            split = self.splitting = _Split(full, index & ((1 << depth) - 1), depth,
                                            self.host)
        if not split.step():
            return False
        self.splitting = None
        depth, high = split.depth, split.high
        grew = False
        if depth == len(self.depths).bit_length() - 1:  # as split as the directory
            self.shards += self.shards
            self.depths += self.depths
            self.mask = len(self.shards) - 1
            grew = True
        shard = split.shard
        deque(map(shard.__delitem__, high), 0)
        low = shard if shard else {}  # an emptied dict keeps its size
        for entry in range(split.base, len(self.shards), 1 << depth):
            self.shards[entry] = high if entry >> depth & 1 else low
            self.depths[entry] = depth + 1
        return grew


class _Split(Generic[T]):
    """A shard's split in progress: its high half (the entries whose hash has the bit
    ``1 << depth``) copied into ``high``, a snapshot of its keys SPLIT_STEP at a time."""

    __slots__ = ("base", "bit", "depth", "high", "host", "keys", "pos", "shard")

    def __init__(self, shard: dict[Prefix, T], base: int, depth: int, host: int) -> None:
        self.shard, self.base, self.depth, self.host = shard, base, depth, host
        self.bit = 1 << depth
        self.keys = list(shard)
        self.pos = 0
        self.high: dict[Prefix, T] = {}

    def step(self) -> bool:
        """Copy the next SPLIT_STEP keys' entries of the high half; whether all are."""
        shard, high, host, bit = self.shard, self.high, self.host, self.bit
        end = self.pos + SPLIT_STEP
        for prefix in self.keys[self.pos:end]:
            if ((prefix & host) >> SHARD_SHIFT) % SHARD_SPREAD & bit:
                value = shard.get(prefix)
                if value is not None:  # (removed since the snapshot: skipped)
                    high[prefix] = value
        self.pos = end
        return end >= len(self.keys)

    def mirror(self, inserted: Sequence[Prefix], value: T | None) -> None:
        """The shard got ``inserted`` routed to ``value`` (None: removed): the copy too."""
        host, bit = self.host, self.bit
        mine = [prefix for prefix in inserted
                if ((prefix & host) >> SHARD_SHIFT) % SHARD_SPREAD & bit]
        if value is None:
            deque(map(self.high.pop, mine, itertools.repeat(None)), 0)
        else:
            self.high.update(dict.fromkeys(mine, value))


_Segment = dict[Prefix, None]


_stamps = itertools.count(1)  # of owners' changes, never the same twice (0: no prefixes)


class _Owner(Generic[T]):
    """A value and its prefixes in insertion order. Most peers have a few prefixes: they
    are one dict, and the owner the only object the garbage collector walks (as before
    segments; per-owner lists and sets made 20,000 peers cost 5 tracked objects and
    ~390 more bytes each). Past SHARD_AT they are segments of at most SHARD_AT, the
    newest last, so neither appending a million nor removing them resizes a big dict.
    Only the newest segment is appended to; one emptied is dropped. Finding a prefix
    searches the segments from both ends inwards (at most a few hundred probes).

    A snapshot (``get``) holds the segments themselves, counted in ``held`` until the
    snapshot has read each whole or is garbage: one held is copied before it changes
    (at most SHARD_AT entries each; a change to many while a get has not read them
    yet still copies each). A segment's ``get=1`` lines, once read whole, are kept (as
    bytes: ~24 a prefix, a third of a list of texts) until it changes: ``wg show`` in a
    loop renders nothing, and a change drops the lines of the segments it touched only.
    ``held`` and ``texts`` exist only while they hold something. ``stamp`` is new at
    every change (``AllowedIPs.stamp``)."""

    __slots__ = ("_segments", "held", "size", "stamp", "texts", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.stamp = next(_stamps)
        self._segments: _Segment | list[_Segment] = []  # one segment: the dict itself
        self.size = 0
        self.held: dict[int, int] | None = None  # by id of a segment: snapshots holding it
        self.texts: dict[int, bytes] | None = None  # by id of a segment: its get=1 lines

    @property
    def segments(self) -> list[_Segment]:
        segments = self._segments
        return [segments] if isinstance(segments, dict) else segments

    @segments.setter
    def segments(self, segments: list[_Segment]) -> None:
        self._segments = segments[0] if len(segments) == 1 else segments

    def __iter__(self) -> Iterator[Prefix]:
        return itertools.chain.from_iterable(self.segments)

    def snapshot(self) -> list[_Segment]:
        segments = self.segments
        held = self.held or {}
        for segment in segments:
            held[id(segment)] = held.get(id(segment), 0) + 1
        self.held = held  # after: a release (a snapshot's __del__) may run meanwhile
        return list(segments)

    def release(self, segments: list[_Segment]) -> None:
        """A snapshot of these segments is gone: they may change in place again."""
        held = self.held or {}
        for segment in segments:
            count = held.pop(id(segment), 0)  # none: copied since
            if count > 1:
                held[id(segment)] = count - 1
        self.held = held or None

    def keep(self, segment: _Segment, lines: bytes) -> None:
        """Keep a snapshot's segment's lines, if the segment is still unchanged (and long
        enough to be worth it)."""
        held = self.held
        if held and id(segment) in held and len(segment) >= KEEP_TEXT_AT:
            self.texts = self.texts or {}
            self.texts[id(segment)] = lines

    def kept(self, segment: _Segment) -> bytes | None:
        """The lines kept of a segment (none once it changed, or was dropped)."""
        return self.texts.get(id(segment)) if self.texts else None

    def _writable(self, index: int) -> _Segment:
        segments = self.segments
        segment = segments[index]
        self._forget(segment)
        if self._unhold(segment):
            segment = segments[index] = dict(segment)
            self.segments = segments
        return segment

    def _unhold(self, segment: _Segment) -> bool:
        """Drop the holds on a segment (it is copied or dropped); return if it had any."""
        held = self.held  # a local: a release may set the attribute to None meanwhile
        if not held or not held.pop(id(segment), 0):
            return False
        if not held:
            self.held = None
        return True

    def _forget(self, segment: _Segment) -> None:
        if self.texts:
            self.texts.pop(id(segment), None)
            self.texts = self.texts or None

    def _drop_empty(self) -> None:
        for segment in self.segments:
            if not segment:
                self._unhold(segment)
        self.segments = [segment for segment in self.segments if segment]

    def append(self, fresh: Sequence[Prefix]) -> None:
        """Add prefixes it does not hold at the end (one given twice, once)."""
        self.stamp = next(_stamps)
        segments = self.segments
        if not segments or len(segments[-1]) + len(fresh) > SHARD_AT:
            fresh = list(dict.fromkeys(fresh))  # a repeat must not land in two segments
        start = 0
        while start < len(fresh):
            if not segments or len(segments[-1]) >= SHARD_AT:
                self.segments = segments = [*segments, {}]
            last = self._writable(-1)
            room, size = SHARD_AT - len(last), len(last)
            last.update(dict.fromkeys(fresh if not start and room >= len(fresh)
                                      else fresh[start:start + room]))
            self.size += len(last) - size
            start += room
            segments = self.segments

    def delete(self, prefixes: Iterable[Prefix]) -> None:
        """Remove prefixes it holds, each once."""
        self.stamp = next(_stamps)
        left = set(prefixes)
        self.size -= len(left)
        segments = self.segments
        for index in _ends_first(len(segments)):
            if not left:
                break
            found = segments[index].keys() & left
            if found:
                deque(map(self._writable(index).__delitem__, found), 0)
                left -= found
                segments = self.segments
        self._drop_empty()

    def oldest(self, limit: int | None) -> list[Prefix]:
        """The first ``limit`` prefixes (None: all), removed."""
        self.stamp = next(_stamps)
        taken: list[Prefix] = []
        while self.size > len(taken) and (limit is None or len(taken) < limit):
            segment = self.segments[0]
            part = list(segment if limit is None
                        else itertools.islice(segment, limit - len(taken)))
            if len(part) == len(segment):
                self._forget(segment)
                self._unhold(segment)
                self.segments = self.segments[1:]
            else:
                deque(map(self._writable(0).__delitem__, part), 0)
            taken += part
        self.size -= len(taken)
        return taken


def _ends_first(count: int) -> list[int]:
    """Indices from both ends inwards (0, count - 1, 1, ...): batches of removals often
    come oldest or newest first, and are then found at the first or second probe
    (searched oldest first, newest-first removals probed every segment)."""
    both = itertools.chain.from_iterable(zip(range(count), reversed(range(count)), strict=True))
    return list(itertools.islice(both, count))


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
                table = tables[tag] = _Table(128 if tag & 1 else 32)
                self._reindex(tag & 1)
            full = []
            split = table.splitting
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
                if split is not None and shard is split.shard:
                    split.mirror(part, value)
                table.size += len(shard) - size
                if len(shard) > SHARD_AT:
                    full.append(shard)
            # A split a step at a time, one at a time, of the fullest shard a call
            # filled: a shard past SHARD_AT grows only by inserts, and each of those
            # goes on with a split.
            if (full or split) and table.split_step(max(full, key=len) if full else None):
                self._reindex(tag & 1)
        for key, gone in lost.items():
            self._disown(self._owned[key], gone)
        owner.append([prefix for prefix in prefixes if prefix not in held]
                     if held else prefixes)
        if not owner.size:
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
            emptied: list[int] = []
            split = table.splitting
            for shard, part in table.parts(group):
                # (C-level: which of the part the shard maps to this very value)
                ours = list(itertools.compress(
                    part, map(is_, map(shard.get, part), itertools.repeat(value))))
                deque(map(shard.__delitem__, ours), 0)
                if split is not None and shard is split.shard:
                    split.mirror(ours, None)
                if ours and not shard:
                    emptied.append(table.index(ours[0]))
                table.size -= len(ours)
                mine += ours
            table.renew(emptied)
            if not table.size:
                del self._tables[tag]
                self._reindex(tag & 1)
        owner.delete(mine)
        if not owner.size:
            del self._owned[id(value)]
        return len(mine)

    def remove_value(self, value: T, limit: int | None = None) -> bool:
        """Remove the prefixes owned by ``value``, at most ``limit`` of them (oldest
        first; None: all); return whether it still owns any."""
        self.remove_oldest(value, limit)
        return self.owns(value)

    def owns(self, value: T) -> bool:
        """Whether any prefix routes to ``value``."""
        return id(value) in self._owned

    def remove_oldest(self, value: T, limit: int | None = None) -> list[Prefix]:
        """``remove_value``, returning the prefixes it removed."""
        owner = self._owned.get(id(value))
        if owner is None:
            return []
        removed = owner.oldest(limit)
        for tag, group in _by_tag(removed):
            table = self._tables[tag]
            for shard, part in table.parts(group):
                deque(map(shard.__delitem__, part), 0)
                if table.splitting is not None and shard is table.splitting.shard:
                    table.splitting.mirror(part, None)
                if not shard:
                    table.renew([table.index(part[0])])
            table.size -= len(group)
            if not table.size:
                del self._tables[tag]
                self._reindex(tag & 1)
        if not owner.size:
            del self._owned[id(value)]
        return removed

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
            value = shards[(number >> shard_shift) % SHARD_SPREAD & mask].get(
                number >> shift | tag_bits)
            if value is not None:
                return value
        return None

    def prefixes(self, value: T) -> list[Prefix]:
        """The prefixes owned by ``value``, in the order they were given to it."""
        owner = self._owned.get(id(value))
        return [] if owner is None else list(owner)

    def texts(self, value: T) -> Sequence[str]:
        """A snapshot of ``prefixes(value)`` as text (``10.0.0.0/8``, as ``get=1``
        reports them): ``few_texts`` if there are few, else rendered only as they are
        read (each segment's kept once read)."""
        few = self.few_texts(value)
        return self.text_snapshot(value) if few is None else few

    def text_snapshot(self, value: T) -> PrefixTexts:
        """``texts`` of a value that has prefixes, rendered only as they are read."""
        return PrefixTexts(self._owned[id(value)])

    def few_texts(self, value: T) -> list[str] | None:
        """``prefixes(value)`` as text, if they are one segment of at most RENDER_AT_ONCE
        (rendered at once; most peers have one prefix or a few); None if more."""
        owner = self._owned.get(id(value))
        if owner is None:
            return []
        segments = owner._segments
        if isinstance(segments, dict) and len(segments) <= RENDER_AT_ONCE:
            return prefix_texts(list(segments))
        return None

    def stamp(self, value: T) -> int:
        """A number that changes whenever ``value``'s prefixes do, and is never the same
        for two different sets of them (0: it has none): what a text of them is kept by."""
        owner = self._owned.get(id(value))
        return 0 if owner is None else owner.stamp

    def _disown(self, owner: _Owner[T], prefixes: list[Prefix]) -> None:
        owner.delete(prefixes)
        if not owner.size:
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


def render_lines(texts: Sequence[str]) -> bytes:
    """Prefixes' texts as ``get=1`` lists them: ``allowed_ip=10.0.0.0/8\\n`` each."""
    return (LINE_HEAD + _NEXT_LINE.join(texts) + "\n").encode() if texts else b""


class PrefixTexts(Sequence[str]):
    """Prefixes as text, from a snapshot of an owner's segments: a ``get`` of a million
    prefixes renders each piece just before it is sent, not all of them at once.
    ``lines`` reads them as ``get=1`` sends them; a segment it reads whole gives its
    lines to the owner to keep (if it has KEEP_TEXT_AT prefixes or more), and a kept
    one is read as it is. Single items and iteration render without keeping. The
    snapshot's hold on a segment ends when it has the segment's whole lines, or is
    garbage: later changes then edit the segment in place, not a copy of it (after a
    get, a change touching every segment of a 1M owner copied them all in one step)."""

    __slots__ = ("_done", "_owner", "_segments", "_starts")

    def __init__(self, owner: _Owner[Any]) -> None:
        self._owner = owner
        self._segments = owner.snapshot()
        self._starts = list(itertools.accumulate(map(len, self._segments), initial=0))
        self._done: dict[int, bytes] = {}  # by number: lines of a segment released

    def __del__(self) -> None:
        self._owner.release([segment for number, segment in enumerate(self._segments)
                             if number not in self._done])

    def __len__(self) -> int:
        return self._starts[-1]

    def lines(self, step: int) -> Iterator[tuple[int, bytes]]:
        """``get=1``'s lines of these prefixes, in pieces of at most ``step`` prefixes
        rendered at once, or a kept segment's whole: (prefixes, bytes) each."""
        for number, segment in enumerate(self._segments):
            whole = self._whole(number)
            if whole is not None:
                yield len(segment), whole
                continue
            keys, parts = list(segment), []
            for start in range(0, len(keys), step):
                chunk = prefix_texts(keys[start:start + step])
                parts.append(render_lines(chunk))
                yield len(chunk), parts[-1]
            whole = parts[0] if len(parts) == 1 else b"".join(parts)
            self._owner.keep(segment, whole)
            self._done[number] = whole
            self._owner.release([segment])

    def __iter__(self) -> Iterator[str]:
        for number in range(len(self._segments)):
            yield from self._texts(number)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if not isinstance(index, slice):
            if not -len(self) <= index < len(self):
                raise IndexError("prefix index out of range")
            index %= len(self)
            number = bisect.bisect_right(self._starts, index) - 1
            low = index - self._starts[number]
            return self._texts(number, low, low + 1)[0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            return [self[i] for i in range(start, stop, step)]
        out: list[str] = []
        while start < stop:
            number = bisect.bisect_right(self._starts, start) - 1
            base = self._starts[number]
            high = min(stop, self._starts[number + 1])
            out += self._texts(number, start - base, high - base)
            start = high
        return out

    def _texts(self, number: int, low: int = 0, high: int | None = None) -> list[str]:
        """The text of segment ``number``'s prefixes ``low:high``."""
        whole = self._whole(number)
        if whole is None:
            return prefix_texts(list(itertools.islice(self._segments[number], low, high)))
        skip = len(LINE_HEAD)
        return [line[skip:] for line in whole.decode().splitlines()[low:high]]

    def _whole(self, number: int) -> bytes | None:
        """Segment ``number``'s whole lines, if this snapshot or the owner has them."""
        done = self._done.get(number)
        if done is None:
            segment = self._segments[number]
            done = self._owner.kept(segment)
            if done is not None:  # kept: unchanged since, so still held
                self._done[number] = done
                self._owner.release([segment])
        return done

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PrefixTexts({list(self)!r})"
