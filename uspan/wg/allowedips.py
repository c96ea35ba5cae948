"""Cryptokey routing: longest-prefix match of IPv4 and IPv6 addresses to a value (a peer).

Prefixes are plain ints (``uspan.wg.prefix``). Each (family, length) present has one
dict from its prefixes to their values; a lookup probes these dicts from the longest
length to the shortest, so it costs one dict probe per distinct prefix length present in
that family, whatever the number of prefixes. Values are compared by identity, as peers
are. Each owner also keeps its prefixes in insertion order (the same int objects as the
tables: a million prefixes cost two dict entries and one int each, and nothing the
garbage collector walks), so ``get=1`` lists them and a peer's removal finds them. An
owner's text, once read whole, is kept until its prefixes change: ``wg show`` in a loop,
or many clients polling, then costs no rendering.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, overload

from uspan.wg.config import Prefix
from uspan.wg.prefix import tag as prefix_tag
from uspan.wg.prefix import texts as prefix_texts

T = TypeVar("T")


class _Owner(Generic[T]):
    __slots__ = ("prefixes", "stamp", "texts", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.prefixes: dict[Prefix, None] = {}  # in insertion order
        self.stamp = 0  # AllowedIPs._edits when the prefixes last changed
        self.texts: list[str] | None = None  # their text, if read whole since


class AllowedIPs(Generic[T]):
    """Maps IP prefixes to values; every prefix has exactly one owner."""

    __slots__ = ("_edits", "_owned", "_tables", "_v4", "_v6")

    def __init__(self) -> None:
        self._tables: dict[int, dict[Prefix, T]] = {}  # by prefix.tag
        # Per family: (host-bit shift, tag << width, table), longest prefix first.
        self._v4: list[tuple[int, int, dict[Prefix, T]]] = []
        self._v6: list[tuple[int, int, dict[Prefix, T]]] = []
        self._owned: dict[int, _Owner[T]] = {}  # by id(value)
        self._edits = 0

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())

    def insert(self, prefixes: Sequence[Prefix], value: T) -> None:
        """Route each prefix to ``value``, taking it over from any previous owner."""
        if value is None:
            raise ValueError("allowed IPs need a value, not None")
        owner = self._owned.get(id(value))
        if owner is None:
            owner = self._owned[id(value)] = _Owner(value)
        self._changed(owner)
        tables = self._tables
        for tag, group in _by_tag(prefixes):
            table = tables.get(tag)
            if table is None:
                table = tables[tag] = {}
                self._reindex(tag & 1)
            # In C but for the prefixes some other value held: they are rare.
            for taken in table.keys() & group if table else ():
                previous = table[taken]
                if previous is not value:
                    self._disown(previous, taken)
            table.update(dict.fromkeys(group, value))
        owner.prefixes.update(dict.fromkeys(prefixes))  # in their order, whatever the tags
        if not owner.prefixes:
            del self._owned[id(value)]

    def remove(self, prefixes: Sequence[Prefix], value: T) -> int:
        """Remove each prefix that ``value`` owns; return how many it owned."""
        owner = self._owned.get(id(value))
        if owner is None:
            return 0
        self._changed(owner)
        owned, tables = owner.prefixes, self._tables
        mine = owned.keys() & prefixes  # what value owns is exactly where its table has it
        for tag, group in _by_tag(list(mine)):
            table = tables[tag]
            deque(map(table.__delitem__, group), 0)
            deque(map(owned.__delitem__, group), 0)
            if not table:
                del tables[tag]
                self._reindex(tag & 1)
        if not owned:
            del self._owned[id(value)]
        return len(mine)

    def remove_value(self, value: T, limit: int | None = None) -> bool:
        """Remove the prefixes owned by ``value``, at most ``limit`` of them (oldest
        first; None: all); return whether it still owns any."""
        owner = self._owned.get(id(value))
        if owner is None:
            return False
        self._changed(owner)
        owned = owner.prefixes
        emptied: set[int] = set()
        for prefix in list(owned if limit is None else itertools.islice(owned, limit)):
            del owned[prefix]
            tag = prefix_tag(prefix)
            table = self._tables[tag]
            del table[prefix]
            if not table:
                del self._tables[tag]
                emptied.add(tag & 1)
        for family in emptied:
            self._reindex(family)
        if owned:
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
        for shift, tag_bits, table in chain:
            value = table.get(number >> shift | tag_bits)
            if value is not None:
                return value
        return None

    def prefixes(self, value: T) -> list[Prefix]:
        """The prefixes owned by ``value``, in the order they were given to it."""
        owner = self._owned.get(id(value))
        return [] if owner is None else list(owner.prefixes)

    def texts(self, value: T) -> Sequence[str]:
        """A snapshot of ``prefixes(value)`` as text (``10.0.0.0/8``, as ``get=1``
        reports them), rendered only as it is read, and kept once read whole."""
        owner = self._owned.get(id(value))
        if owner is None:
            return []
        if owner.texts is not None:
            return owner.texts
        stamp = owner.stamp

        def keep(texts: list[str]) -> None:
            if owner.stamp == stamp:  # unchanged since the snapshot
                owner.texts = texts

        return PrefixTexts(list(owner.prefixes), keep)

    def _changed(self, owner: _Owner[T]) -> None:
        self._edits += 1
        owner.stamp, owner.texts = self._edits, None

    def _disown(self, value: T, prefix: Prefix) -> None:
        owner = self._owned[id(value)]
        self._changed(owner)
        del owner.prefixes[prefix]
        if not owner.prefixes:
            del self._owned[id(value)]

    def _reindex(self, v6: int) -> None:
        width = 128 if v6 else 32
        chain = sorted(
            ((width - (tag >> 1), tag << width, table) for tag, table in self._tables.items()
             if tag & 1 == v6),
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
    """Prefixes as text, from a snapshot: a ``get`` of a million prefixes renders each
    piece just before it is sent, not all of them at once. Read in order, slice after
    slice, to the end, the whole text goes to ``keep``."""

    __slots__ = ("_keep", "_keys", "_read")

    def __init__(self, keys: list[Prefix], keep: Callable[[list[str]], None]) -> None:
        self._keys = keys
        self._keep = keep
        self._read: list[str] = []  # what was read in order so far

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if not isinstance(index, slice):
            return prefix_texts([self._keys[index]])[0]
        texts = prefix_texts(self._keys[index])
        read = self._read
        if index.start == len(read) and index.step is None and texts:
            read += texts
            if len(read) == len(self._keys):
                self._keep(read)
        return texts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PrefixTexts({list(self)!r})"
