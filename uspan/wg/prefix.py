"""IP prefixes as plain ints: how the UAPI, the configuration and cryptokey routing carry them.

A prefix is its network bits (the address shifted right past the host bits, so host bits
are masked off) with its tag, ``length << 1 | v6``, above them: at bit 32 for IPv4, at
bit 128 for IPv6 (``tag``). A million ``ipaddress`` networks cost ~10 us and ~400 bytes
each to make and hash, and the cycle collector walks them; an IPv4 prefix is an int of
32 bytes that hashes to itself, so neighbouring prefixes sit side by side in a dict
(three times faster to insert a million of them than with the tag in the low bits).
``scan`` reads a big request's ``allowed_ip=`` lines of IPv4 prefixes straight from its
bytes, in C (``uspan/wg/_prefix.c``, ~20x ``parse``), and stops at any other line.
``parse`` and ``texts`` are the other hot loops, so IPv4 text is converted through small
caches of its first three octets (a big request repeats them: 256 hosts share one) and a
table of every last octet and length.
"""

from __future__ import annotations

import ipaddress
import socket

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


def scan_py(data: bytes | bytearray, pos: int, limit: int,
            key: bytes) -> tuple[list[Prefix], int]:
    """``scan`` in Python (where ``uspan/wg/_prefix.c`` was not built): the same lines,
    each through ``parse``."""
    out: list[Prefix] = []
    while len(out) < limit:
        end = data.find(b"\n", pos)
        if end < 0 or not data.startswith(key, pos) or end < pos + len(key):
            break
        try:
            text = data[pos + len(key):end].decode("ascii")
            if ":" in text:
                break  # IPv6: not a line scan reads
            out.append(parse(text))
        except ValueError:  # UnicodeDecodeError too
            break
        pos = end + 1
    return out, pos


try:
    from uspan.wg._prefix import scan as scan
except ImportError:  # not built: the same in Python
    scan = scan_py
COMPILED = scan is not scan_py  # which one ``scan`` is


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

