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
else (not of the responses, which answer our own initiations). ``program`` is pure
(tested by attaching it to real sockets).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from collections.abc import Sequence

from uspan.wg.constants import INITIATION_SIZE, MSG_INITIATION, MSG_RESPONSE, RESPONSE_SIZE

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
MAX_SOURCES = 256  # 5 (IPv4) or 11 (IPv6) instructions each, far below the kernel's 4096
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


def program(family: int, sources: Sequence[tuple[bytes, int]],
            keep: float = 1.0) -> list[Instruction]:
    """A filter dropping mac2-less initiations and responses from ``sources`` ((packed
    ip, port)) of ``family`` (sources of the other family are ignored), and of the others
    all but a random fraction ``keep``."""
    size = 4 if family == socket.AF_INET else 16
    where = _SKF_NET_OFF + (12 if family == socket.AF_INET else 8)  # source address
    initiation = _mac2_less(INITIATION_SIZE, MSG_INITIATION)
    response = _mac2_less(RESPONSE_SIZE, MSG_RESPONSE)
    code: list[Instruction] = [(_LD_LEN, 0, 0, 0),
                               (_JEQ, 0, len(initiation) + 1, _UDP + INITIATION_SIZE)]
    code += [*initiation, (_JA, 0, 0, 2 + len(response))]  # on to the sources
    code += [(_JEQ, 1, 0, _UDP + RESPONSE_SIZE), (_RET, 0, 0, _PASS), *response]
    for ip, port in sources[:MAX_SOURCES]:
        if len(ip) != size:
            continue
        words = struct.unpack(f"!{size // 4}I", ip)
        rest = 2 * len(words) + 1  # the loads and compares of the address, and the drop
        code += [(_LD_H, 0, 0, 0), (_JEQ, 0, rest, port)]
        for i, word in enumerate(words):
            rest -= 2
            code += [(_LD_W, 0, 0, _u32(where + 4 * i)), (_JEQ, 0, rest, word)]
        code.append((_RET, 0, 0, _DROP))
    if keep < 1.0:  # initiations only: responses answer our own handshakes
        code += [(_LD_LEN, 0, 0, 0), (_JEQ, 3, 0, _UDP + RESPONSE_SIZE),
                 (_LD_W, 0, 0, _u32(_SKF_AD_RANDOM)), (_JGE, 0, 1, int(keep * 2**32)),
                 (_RET, 0, 0, _DROP)]
    code.append((_RET, 0, 0, _PASS))
    return code


def attach(sock: socket.socket, code: Sequence[Instruction]) -> None:
    """Replace the socket's filter with ``code`` (atomically, as the kernel does)."""
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in code)
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("@HP", len(code), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """Remove the socket's filter, if it has one."""
    with contextlib.suppress(FileNotFoundError):  # ENOENT: none attached
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
