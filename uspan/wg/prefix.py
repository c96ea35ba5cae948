"""IP prefixes as plain ints: how the UAPI, the configuration and cryptokey routing carry them.

A prefix is ``bits << 9 | length << 1 | v6``: its network bits (the address shifted right
past the host bits, so host bits are masked off), its length, and 1 for IPv6. A million
``ipaddress`` networks cost ~10 us and ~400 bytes each to make and hash, and the cycle
collector walks them; one int costs 32 bytes and nothing to hash. ``parse`` and
``texts`` are the UAPI's hot loops, so IPv4 text is converted through small caches of its
first three octets (a big request repeats them: 256 hosts share one).
"""

from __future__ import annotations

import ipaddress
import socket

from uspan.wg.config import Network, Prefix

_LENGTHS4 = {str(n): n for n in range(33)}  # the usual forms; _length takes the rest
_LENGTHS6 = {str(n): n for n in range(129)}
_OCTETS = {str(n): n for n in range(256)}
_OCTET_TEXTS = [str(n) for n in range(256)]
_LENGTH_TEXTS = [f"/{n}" for n in range(129)]
_CACHE_LIMIT = 1 << 16  # entries of each cache before it starts over
_heads: dict[str, int] = {}  # "10.1.2" -> 10.1.2.0 as an int
_head_texts: dict[int, str] = {}  # 10.1.2.0 >> 8 -> "10.1.2."


def parse(text: str) -> Prefix:
    """``10.0.0.0/8`` or ``fd00::/8``, host bits masked off; ValueError if malformed.

    What wireguard-go accepts: addresses as strict as ``inet_pton`` (four decimal octets
    without leading zeros; any IPv6 form, no zone), a length in decimal up to the
    family's width, with a sign and leading zeros allowed (as Go's ``strconv.Atoi``)."""
    address, _, length_text = text.partition("/")
    if ":" in address:
        length = _LENGTHS6.get(length_text)
        if length is None:
            length = _length(length_text, 128)
        try:
            number = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        except (OSError, ValueError):  # ValueError: an embedded NUL or a non-ASCII one
            raise _malformed(text) from None
        if length is None:
            raise _malformed(text)
        return (number >> (128 - length)) << 9 | length << 1 | 1
    length = _LENGTHS4.get(length_text)
    if length is None:
        length = _length(length_text, 32)
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
    return ((high | octet) >> (32 - length)) << 9 | length << 1


def _length(text: str, width: int) -> int | None:
    digits = text[1:] if text.startswith(("+", "-")) else text
    if not (digits.isascii() and digits.isdigit()):
        return None
    digits = digits.lstrip("0") or "0"
    if len(digits) > 3 or int(digits) > width or (text[0] == "-" and digits != "0"):
        return None
    return int(digits)


def _malformed(text: str) -> ValueError:
    return ValueError(f"{text[:64]!r} is not an IP prefix like 10.0.0.0/24")


def of(network: Network) -> Prefix:
    """The prefix of an ``ipaddress`` network."""
    length = network.prefixlen
    bits = int(network.network_address) >> (network.max_prefixlen - length)
    return bits << 9 | length << 1 | (network.version == 6)


def network(prefix: Prefix) -> Network:
    """The ``ipaddress`` network of a prefix."""
    length = prefix >> 1 & 0xFF
    if prefix & 1:
        return ipaddress.IPv6Network((prefix >> 9 << (128 - length), length))
    return ipaddress.IPv4Network((prefix >> 9 << (32 - length), length))


def texts(prefixes: list[Prefix]) -> list[str]:
    """Each prefix as ``get=1`` reports it (``10.0.0.0/8``, ``fd00::/8``)."""
    out: list[str] = []
    append = out.append
    heads, octets, lengths = _head_texts, _OCTET_TEXTS, _LENGTH_TEXTS
    for prefix in prefixes:
        length = prefix >> 1 & 0xFF
        if prefix & 1:
            number = prefix >> 9 << (128 - length)
            if 1 << 16 <= number < 1 << 32:  # inet_ntop would write ::10.0.0.1, Go ::a00:1
                address = str(ipaddress.IPv6Address(number))
            else:
                address = socket.inet_ntop(socket.AF_INET6, number.to_bytes(16, "big"))
            append(address + lengths[length])
            continue
        number = prefix >> 9 << (32 - length)
        head = heads.get(number >> 8)
        if head is None:
            if len(heads) >= _CACHE_LIMIT:
                heads.clear()
            head = heads[number >> 8] = socket.inet_ntop(
                socket.AF_INET, number.to_bytes(4, "big")).rpartition(".")[0] + "."
        append(head + octets[number & 0xFF] + lengths[length])
    return out

