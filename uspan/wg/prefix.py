"""IP prefixes as plain ints: how the UAPI, the configuration and cryptokey routing carry them.

A prefix is its network bits (the address shifted right past the host bits, so host bits
are masked off) with its tag, ``length << 1 | v6``, above them: at bit 32 for IPv4, at
bit 128 for IPv6 (``tag``). A million ``ipaddress`` networks cost ~10 us and ~400 bytes
each to make and hash, and the cycle collector walks them; an IPv4 prefix is an int of
32 bytes that hashes to itself, so neighbouring prefixes sit side by side in a dict
(three times faster to insert a million of them than with the tag in the low bits). ``parse`` and
``texts`` are the UAPI's hot loops, so IPv4 text is converted through small caches of its
first three octets (a big request repeats them: 256 hosts share one) and a table of
every last octet and length.
"""

from __future__ import annotations

import ipaddress
import socket
from itertools import repeat
from operator import add, itemgetter

from uspan.wg.config import Network, Prefix

_LENGTHS4 = {str(n): n for n in range(33)}  # the only forms a length may take
_LENGTHS6 = {str(n): n for n in range(129)}
_OCTETS = {str(n): n for n in range(256)}
_OCTET_TEXTS = [str(n) for n in range(256)]
_LENGTH_TEXTS = [f"/{n}" for n in range(129)]
_BITS4 = (1 << 32) - 1
_BITS6 = (1 << 128) - 1
_CACHE_LIMIT = 1 << 16  # entries of each cache before it starts over
_heads: dict[str, int] = {}  # "10.1.2" -> 10.1.2.0 as an int (only valid ones)
# "4/24" -> (4, host-bit shift, tag bits): the last octet and length, canonical forms
_tails = {f"{octet}/{length}": (octet, 32 - length, length << 33)
          for octet in range(256) for length in range(33)}
_head_texts: dict[int, str] = {}  # 10.1.2.0 >> 8 -> "10.1.2."
# Per key: "allowed_ip=10.1.2" -> 10.1.2.0, only heads that are the key and then three
# valid octets (so a hit proves the line starts with the key).
_line_heads: dict[str, dict[str, int]] = {}
_tails32 = {f"{octet}/32": octet | 32 << 33 for octet in range(256)}  # "4/32" -> its bits
_first, _third = itemgetter(0), itemgetter(2)


def parse(text: str) -> Prefix:
    """``10.0.0.0/8`` or ``fd00::/8``, host bits masked off; ValueError if malformed.

    Addresses as strict as ``inet_pton`` (four decimal octets without leading zeros; any
    IPv6 form, no zone) and a length in canonical decimal up to the family's width, as
    Go's ``netip.ParsePrefix`` has required since Go 1.22. Older Go builds of
    wireguard-go also took a sign or leading zeros, which made ``10.0.0.0/-0`` the
    catch-all ``0.0.0.0/0``: refused here."""
    head, _, tail = text.rpartition(".")
    high = _heads.get(head)
    if high is not None:  # the usual IPv4 form, its first three octets seen before
        last = _tails.get(tail)
        if last is not None:
            octet, shift, tag_bits = last
            return (high | octet) >> shift | tag_bits
    return _parse(text)


def parse_lines(lines: list[str], key: str) -> list[Prefix] | None:
    """The prefixes of ``lines`` if each is ``key`` and then an IPv4 /32 (say
    ``allowed_ip=10.1.2.3/32``, what a huge request is made of), else None: then parse
    line by line. A batch goes through C-level maps, half the time of ``parse`` a line:
    the line's first three octets, key included, and its last octet with the length are
    looked up in tables whose sum is the prefix."""
    parts = list(map(str.rpartition, lines, repeat(".")))
    heads = list(map(_first, parts))
    cache = _line_heads.setdefault(key, {})
    highs = list(map(cache.get, heads))
    if None in highs:
        for head in set(heads).difference(cache):
            if not head.startswith(key):
                return None
            try:  # as parse checks the first three octets
                address = socket.inet_pton(socket.AF_INET, head[len(key):] + ".0")
            except (OSError, ValueError):
                return None
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[head] = int.from_bytes(address, "big")
        highs = list(map(cache.get, heads))
    lows = list(map(_tails32.get, map(_third, parts)))
    if None in lows or None in highs:
        return None
    return list(map(add, highs, lows))


def _parse(text: str) -> Prefix:
    address, _, length_text = text.partition("/")
    if ":" in address:
        length = _LENGTHS6.get(length_text)
        try:
            number = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        except (OSError, ValueError):  # ValueError: an embedded NUL or a non-ASCII one
            raise _malformed(text) from None
        if length is None:
            raise _malformed(text)
        return number >> (128 - length) | (length << 1 | 1) << 128
    length = _LENGTHS4.get(length_text)
    head, _, last = address.rpartition(".")
    octet = _OCTETS.get(last)
    if length is None or octet is None:
        raise _malformed(text)
    high = _heads.get(head)
    if high is None:
        try:
            high = int.from_bytes(socket.inet_pton(socket.AF_INET, head + ".0"), "big")
        except (OSError, ValueError):
            raise _malformed(text) from None
        if len(_heads) >= _CACHE_LIMIT:
            _heads.clear()
        _heads[head] = high
    return (high | octet) >> (32 - length) | length << 33


def _malformed(text: str) -> ValueError:
    return ValueError(f"{text[:64]!r} is not an IP prefix like 10.0.0.0/24")


def tag(prefix: Prefix) -> int:
    """``length << 1 | v6``: which table of ``AllowedIPs`` holds the prefix."""
    return prefix >> 128 or prefix >> 32


def of(network: Network) -> Prefix:
    """The prefix of an ``ipaddress`` network."""
    length, width = network.prefixlen, network.max_prefixlen
    tag_ = length << 1 | (width == 128)
    return int(network.network_address) >> (width - length) | tag_ << width


def network(prefix: Prefix) -> Network:
    """The ``ipaddress`` network of a prefix."""
    tag_ = tag(prefix)
    length = tag_ >> 1
    if tag_ & 1:
        return ipaddress.IPv6Network(((prefix & _BITS6) << (128 - length), length))
    return ipaddress.IPv4Network(((prefix & _BITS4) << (32 - length), length))


def texts(prefixes: list[Prefix]) -> list[str]:
    """Each prefix as ``get=1`` reports it (``10.0.0.0/8``, ``fd00::/8``)."""
    out: list[str] = []
    append = out.append
    heads, octets, lengths = _head_texts, _OCTET_TEXTS, _LENGTH_TEXTS
    for prefix in prefixes:
        if prefix >> 128:
            length = prefix >> 129
            number = (prefix & _BITS6) << (128 - length)
            if 1 << 16 <= number < 1 << 32:  # inet_ntop would write ::10.0.0.1, Go ::a00:1
                address = str(ipaddress.IPv6Address(number))
            else:
                address = socket.inet_ntop(socket.AF_INET6, number.to_bytes(16, "big"))
            append(address + lengths[length])
            continue
        length = prefix >> 33
        number = (prefix & _BITS4) << (32 - length)
        head = heads.get(number >> 8)
        if head is None:
            if len(heads) >= _CACHE_LIMIT:
                heads.clear()
            head = heads[number >> 8] = socket.inet_ntop(
                socket.AF_INET, number.to_bytes(4, "big")).rpartition(".")[0] + "."
        append(head + octets[number & 0xFF] + lengths[length])
    return out

