"""Cryptokey routing: longest-prefix match of IPv4 and IPv6 addresses to a value (a peer).

Each (family, prefix length) present has one dict from the prefix's network bits
(the address int shifted right past the host bits) to its value. A lookup probes
these dicts from the longest length to the shortest, so it costs one dict probe per
distinct prefix length present in that family, whatever the number of prefixes.
Values are compared by identity, as peers are. Each owner's prefixes are kept as plain
ints (family, length and bits in one), never as ``ipaddress`` objects: a million prefixes
then cost no objects the garbage collector must walk, and ``texts`` renders them for
``get=1`` without building any.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Sequence
from typing import Generic, TypeVar, overload

from uspan.wg.config import Network

T = TypeVar("T")

# bits << 9 | prefix length << 1 | (1 for IPv6): identifies one stored prefix.
_Key = int


class AllowedIPs(Generic[T]):
    """Maps IP prefixes to values; every prefix has exactly one owner."""

    __slots__ = ("_owned", "_tables", "_v4", "_v6")

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], dict[int, T]] = {}
        # Per family: (host-bit shift, table), longest prefix first.
        self._v4: list[tuple[int, dict[int, T]]] = []
        self._v6: list[tuple[int, dict[int, T]]] = []
        # id(value) -> (value, its prefixes in insertion order).
        self._owned: dict[int, tuple[T, dict[_Key, None]]] = {}

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())

    def insert(self, network: Network, value: T) -> None:
        """Route ``network`` to ``value``, taking it over from any previous owner."""
        if value is None:
            raise ValueError(f"allowed IP {network} needs a value, not None")
        key = _key(network)
        version, length, bits = network.version, network.prefixlen, key >> 9
        table = self._tables.get((version, length))
        if table is None:
            table = self._tables[(version, length)] = {}
            self._reindex(version)
        previous = table.get(bits)
        if previous is value:
            return
        if previous is not None:
            self._disown(previous, key)
        table[bits] = value
        owner = self._owned.get(id(value))
        if owner is None:
            owner = self._owned[id(value)] = (value, {})
        owner[1][key] = None

    def remove(self, network: Network, value: T) -> bool:
        """Remove ``network`` if ``value`` owns it; return whether it did."""
        key = _key(network)
        version, length, bits = network.version, network.prefixlen, key >> 9
        table = self._tables.get((version, length))
        if table is None or table.get(bits) is not value:
            return False
        del table[bits]
        if not table:
            del self._tables[(version, length)]
            self._reindex(version)
        self._disown(value, key)
        return True

    def remove_value(self, value: T, limit: int | None = None) -> bool:
        """Remove the prefixes owned by ``value``, at most ``limit`` of them (oldest
        first; None: all); return whether it still owns any."""
        owner = self._owned.get(id(value))
        if owner is None:
            return False
        prefixes = owner[1]
        keys = list(prefixes if limit is None else itertools.islice(prefixes, limit))
        emptied: set[int] = set()
        for key in keys:
            del prefixes[key]
            version, length, bits = _split(key)
            table = self._tables[(version, length)]
            del table[bits]
            if not table:
                del self._tables[(version, length)]
                emptied.add(version)
        for version in emptied:
            self._reindex(version)
        if prefixes:
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
        for shift, table in chain:
            value = table.get(number >> shift)
            if value is not None:
                return value
        return None

    def networks(self, value: T) -> list[Network]:
        """The prefixes owned by ``value``, in the order they were given to it."""
        owner = self._owned.get(id(value))
        return [] if owner is None else [_network(key) for key in owner[1]]

    def texts(self, value: T) -> PrefixTexts:
        """A snapshot of ``networks(value)`` as text (``10.0.0.0/8``, as ``get=1``
        reports them), rendered only as it is read."""
        owner = self._owned.get(id(value))
        return PrefixTexts([] if owner is None else list(owner[1]))

    def _disown(self, value: T, key: _Key) -> None:
        prefixes = self._owned[id(value)][1]
        del prefixes[key]
        if not prefixes:
            del self._owned[id(value)]

    def _reindex(self, version: int) -> None:
        width = 32 if version == 4 else 128
        tables = self._tables.items()
        chain = sorted(
            ((width - length, table) for (v, length), table in tables if v == version),
            key=lambda entry: entry[0],
        )
        if version == 4:
            self._v4 = chain
        else:
            self._v6 = chain


class PrefixTexts(Sequence[str]):
    """Prefixes as text, from a snapshot of their keys: a ``get`` of a million prefixes
    renders each piece just before it is sent, not all of them at once."""

    __slots__ = ("_keys",)

    def __init__(self, keys: list[_Key]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [_text(key) for key in self._keys[index]]
        return _text(self._keys[index])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PrefixTexts({list(self)!r})"


def _key(network: Network) -> _Key:
    length = network.prefixlen
    bits = int(network.network_address) >> (network.max_prefixlen - length)
    return bits << 9 | length << 1 | (network.version == 6)


def _split(key: _Key) -> tuple[int, int, int]:
    """(version, length, bits) of a key."""
    return 6 if key & 1 else 4, key >> 1 & 0xFF, key >> 9


def _network(key: _Key) -> Network:
    version, length, bits = _split(key)
    if version == 4:
        return ipaddress.IPv4Network((bits << (32 - length), length))
    return ipaddress.IPv6Network((bits << (128 - length), length))


def _text(key: _Key) -> str:
    version, length, bits = _split(key)
    if version == 4:
        address = socket.inet_ntop(socket.AF_INET, (bits << (32 - length)).to_bytes(4, "big"))
    else:
        address = socket.inet_ntop(socket.AF_INET6,
                                   (bits << (128 - length)).to_bytes(16, "big"))
    return f"{address}/{length}"
