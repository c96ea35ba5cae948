"""Drop a handshake flood in the kernel: a classic BPF filter on the UDP sockets.

Under a flood, what costs is not only our answer but getting each datagram out of the
socket in Python: the queue fills and the kernel drops at random, a real peer's
initiation as likely as the junk. The core (``uspan.wg.admission``) names the sources
it refuses; this filter drops their handshake messages that carry no mac2 (initiations:
148 bytes, type 1; responses: 92 bytes, type 2; the last 16 bytes zero) before they are
queued, so they cost the kernel a few instructions and us nothing. Everything else
passes: transport data, cookie replies, and any handshake with a mac2, which a real peer
behind a flagged address sends once it has a cookie. Against spoofed sources, which
never repeat, it keeps only a random fraction of the mac2-less initiations from everyone
else (not of the responses, which answer our own initiations), but passes all from the
peers' endpoints (the core's priority lane), checked first: a known peer's first
initiation is never lost to the flood. ``program`` is pure (tested by attaching it to
real sockets).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import replace

from uspan.wg.admission import MAX_TRUSTED, KernelFilter
from uspan.wg.constants import INITIATION_SIZE, MSG_INITIATION, MSG_RESPONSE, RESPONSE_SIZE
from uspan.wg.endpoint import Endpoint

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# Each source costs 5 (IPv4) or 11 (IPv6) instructions: MAX_SOURCES flagged and
# MAX_TRUSTED of the lane (passed or abused) stay below the kernel's 4096 (``install``
# copes with a tighter optmem_max).
MAX_SOURCES = 256
_SKF_NET_OFF = -0x100000  # loads relative to the IP header (the filter starts at UDP's)
_SKF_AD_RANDOM = -0x1000 + 56  # a random u32 (SKF_AD_OFF + SKF_AD_RANDOM)
_LD_LEN, _LD_W, _LD_H, _JA, _JEQ, _JGE, _RET = 0x80, 0x20, 0x28, 0x05, 0x15, 0x35, 0x06
_PASS, _DROP = 0xFFFFFFFF, 0
_UDP = 8  # the UDP header; the WireGuard message follows

Instruction = tuple[int, int, int, int]  # code, jump if true, jump if false, k


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def _mac2_less(length: int, kind: int) -> list[Instruction]:
    """Message type ``kind`` with a zero mac2 (the message is ``length`` bytes), else pass."""
    code = [(_LD_W, 0, 0, _UDP), (_JEQ, 1, 0, kind << 24), (_RET, 0, 0, _PASS)]  # LE u32
    for offset in range(length - 16, length, 4):
        code += [(_LD_W, 0, 0, _UDP + offset), (_JEQ, 1, 0, 0), (_RET, 0, 0, _PASS)]
    return code


def program(family: int, rules: KernelFilter) -> list[Instruction]:
    """The filter for a socket of ``family`` (sources of the other family are ignored):
    of the mac2-less initiations and responses, pass those from ``rules.lane``, drop
    those from ``rules.flagged`` (at most MAX_SOURCES) and the responses from
    ``rules.abused``, and keep a random fraction ``rules.keep`` of the other
    initiations."""
    initiation = _mac2_less(INITIATION_SIZE, MSG_INITIATION)
    response = _mac2_less(RESPONSE_SIZE, MSG_RESPONSE)
    code: list[Instruction] = [(_LD_LEN, 0, 0, 0),
                               (_JEQ, 0, len(initiation) + 1, _UDP + INITIATION_SIZE)]
    code += [*initiation, (_JA, 0, 0, 2 + len(response))]  # on to the sources
    code += [(_JEQ, 1, 0, _UDP + RESPONSE_SIZE), (_RET, 0, 0, _PASS), *response]
    lane = _of(family, rules.lane, MAX_TRUSTED)
    for source in lane:
        code += _match(family, source, _PASS)
    for source in _of(family, rules.flagged, MAX_SOURCES):
        code += _match(family, source, _DROP)
    abused = [instruction for source in _of(family, rules.abused, MAX_TRUSTED - len(lane))
              for instruction in _match(family, source, _DROP)]
    if abused or rules.keep < 1.0:  # responses answer our own handshakes: never sampled
        code += [(_LD_LEN, 0, 0, 0), (_JEQ, 1, 0, _UDP + RESPONSE_SIZE),
                 (_JA, 0, 0, len(abused) + 1), *abused, (_RET, 0, 0, _PASS)]
    if rules.keep < 1.0:
        code += [(_LD_W, 0, 0, _u32(_SKF_AD_RANDOM)), (_JGE, 0, 1, int(rules.keep * 2**32)),
                 (_RET, 0, 0, _DROP)]
    code.append((_RET, 0, 0, _PASS))
    return code


def _of(family: int, sources: Sequence[Endpoint], most: int) -> list[Endpoint]:
    return [source for source in sources if source.family == family][:most]


def _match(family: int, source: Endpoint, verdict: int) -> list[Instruction]:
    """Return ``verdict`` if the datagram comes from ``source``, else go on."""
    words = struct.unpack(f"!{1 if family == socket.AF_INET else 4}I", source.ip_key())
    where = _SKF_NET_OFF + (12 if family == socket.AF_INET else 8)  # source address
    rest = 2 * len(words) + 1  # the loads and compares of the address, and the return
    code = [(_LD_H, 0, 0, 0), (_JEQ, 0, rest, source.port)]
    for i, word in enumerate(words):
        rest -= 2
        code += [(_LD_W, 0, 0, _u32(where + 4 * i)), (_JEQ, 0, rest, word)]
    code.append((_RET, 0, 0, verdict))
    return code


def attach(sock: socket.socket, code: Sequence[Instruction]) -> None:
    """Replace the socket's filter with ``code`` (atomically, as the kernel does)."""
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in code)
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("@HP", len(code), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def install(sock: socket.socket, rules: KernelFilter) -> None:
    """Attach the filter ``rules`` ask for. The kernel charges a filter to the socket's
    option memory (``net.core.optmem_max``: 20 KiB before Linux 6.9, 128 KiB since), the
    old one and the new together while one replaces the other; if that refuses it, the
    old filter goes first, then flagged sources from the end until it fits (the core
    still refuses those), so the lane and the sample hold on any kernel."""
    try:
        attach(sock, program(sock.family, rules))
        return
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
    detach(sock)
    flagged = rules.flagged
    while True:
        try:
            attach(sock, program(sock.family, replace(rules, flagged=flagged)))
            return
        except OSError as exc:
            if exc.errno != errno.ENOMEM or not flagged:
                raise
            flagged = flagged[:len(flagged) // 2]


def detach(sock: socket.socket) -> None:
    """Remove the socket's filter, if it has one."""
    with contextlib.suppress(FileNotFoundError):  # ENOENT: none attached
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
