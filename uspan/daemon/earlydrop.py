"""Drop a handshake flood in the kernel: a classic BPF filter on the UDP sockets.

Under a flood, what costs is not only our answer but getting each datagram out of the
socket in Python: the queue fills and the kernel drops at random, a real peer's
initiation as likely as the junk. The core (``uspan.wg.admission``) names the sources
it refuses; this filter drops their initiations that carry no mac2 (148 bytes, type 1,
the last 16 bytes zero) before they are queued, so they cost the kernel a few
instructions and us nothing. Everything else passes: transport data, cookie replies,
responses (whatever their source: they may answer our own initiations), and any
initiation with a mac2, which a real peer behind a flagged address sends once it has a
cookie. Against spoofed sources, which never repeat, it keeps only a random fraction of
the mac2-less initiations from everyone else, but passes all from the peers' endpoints
(the core's priority lane), checked first: a known peer's first initiation is never
lost to the flood. ``program`` is pure (tested by attaching it to
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
from uspan.wg.constants import INITIATION_SIZE, MSG_INITIATION
from uspan.wg.endpoint import Endpoint

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# At most MAX_SOURCES flagged and MAX_TRUSTED of the lane, far below the kernel's 4096
# instructions; what optmem_max allows ``install`` works out.
MAX_SOURCES = 256
_SKF_NET_OFF = -0x100000  # loads relative to the IP header (the filter starts at UDP's)
_SKF_AD_RANDOM = -0x1000 + 56  # a random u32 (SKF_AD_OFF + SKF_AD_RANDOM)
_LD_LEN, _LD_W, _LD_H, _LD_MEM, _ST, _TAX, _TXA = 0x80, 0x20, 0x28, 0x60, 0x02, 0x07, 0x87
_JEQ, _JGE, _RET = 0x15, 0x35, 0x06
_PASS, _DROP = 0xFFFFFFFF, 0
_UDP = 8  # the UDP header; the WireGuard message follows
# What the kernel charges a filter to the socket's option memory, a little over what 6.18
# charges these programs (a header, and their eBPF translation: 1.4 KiB, then 9-10 bytes
# a classic instruction); each source checked costs _PER_SOURCE instructions.
_CHARGE_BASE, _CHARGE_PER_INSTRUCTION = 1600, 10
_PER_SOURCE = {socket.AF_INET: 5, socket.AF_INET6: 11}
_OPTMEM_MAX = "/proc/sys/net/core/optmem_max"
_OPTMEM_DEFAULT = 20480  # before Linux 6.9

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
    of the mac2-less initiations, pass those from ``rules.lane``, drop those from
    ``rules.flagged`` (at most MAX_SOURCES), and keep a random fraction ``rules.keep``
    of the others. Everything else passes before any source is looked at: responses
    too, whatever their source, as they may answer our own initiations (the core
    serves those by receiver index and drops the rest after a lookup)."""
    code: list[Instruction] = [(_LD_LEN, 0, 0, 0), (_JEQ, 1, 0, _UDP + INITIATION_SIZE),
                               (_RET, 0, 0, _PASS), *_mac2_less(INITIATION_SIZE, MSG_INITIATION)]
    lane = _of(family, rules.lane, MAX_TRUSTED)
    code += _load_source(family)
    code += _matches(family, [(source, _PASS) for source in lane])
    code += _matches(family, [(source, _DROP)
                              for source in _of(family, rules.flagged, MAX_SOURCES)])
    if rules.keep < 1.0:
        code += [(_LD_W, 0, 0, _u32(_SKF_AD_RANDOM)), (_JGE, 0, 1, int(rules.keep * 2**32)),
                 (_RET, 0, 0, _DROP)]
    code.append((_RET, 0, 0, _PASS))
    return code


def _of(family: int, sources: Sequence[Endpoint], most: int) -> list[Endpoint]:
    return [source for source in sources if source.family == family][:most]


def _load_source(family: int) -> list[Instruction]:
    """Load the source once, not per source checked (the kernel charges every
    instruction): the port into X, the address's 32-bit words into M[0..]."""
    where = _SKF_NET_OFF + (12 if family == socket.AF_INET else 8)  # source address
    code: list[Instruction] = [(_LD_H, 0, 0, 0), (_TAX, 0, 0, 0)]
    for i in range(1 if family == socket.AF_INET else 4):
        code += [(_LD_W, 0, 0, _u32(where + 4 * i)), (_ST, 0, 0, i)]
    return code


def _matches(family: int, sources: Sequence[tuple[Endpoint, int]]) -> list[Instruction]:
    """Return the verdict of the first of ``sources`` the datagram comes from, else go on
    (from what ``_load_source`` left). The address's last word is kept in A, so a
    source that differs there costs one compare; the rest is checked only on a match."""
    last = 0 if family == socket.AF_INET else 3
    code: list[Instruction] = [(_LD_MEM, 0, 0, last)] if sources else []
    for source, verdict in sources:
        words = struct.unpack(f"!{last + 1}I", source.ip_key())
        rest = 2 * last + 3  # to the end of this source's check, where A is reloaded
        check: list[Instruction] = []
        for i in range(last):
            rest -= 2
            check += [(_LD_MEM, 0, 0, i), (_JEQ, 0, rest, words[i])]
        check += [(_TXA, 0, 0, 0), (_JEQ, 0, 1, source.port), (_RET, 0, 0, verdict),
                  (_LD_MEM, 0, 0, last)]
        code += [(_JEQ, 0, len(check), words[last]), *check]
    return code


def attach(sock: socket.socket, code: Sequence[Instruction]) -> None:
    """Replace the socket's filter with ``code`` (atomically, as the kernel does)."""
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in code)
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("@HP", len(code), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def install(sock: socket.socket, rules: KernelFilter) -> None:
    """Attach the filter ``rules`` ask for, replacing the old one in a single step: the
    socket is never left unfiltered. The kernel charges a filter to the socket's option
    memory (``net.core.optmem_max``: 20 KiB before Linux 6.9, 128 KiB since), the old
    and the new together while one replaces the other, so each gets half; sources that
    do not fit give way, flagged ones first (the core still refuses them), then the
    lane's, from the end, down to the sample alone if the kernel refuses even that
    estimate."""
    family = sock.family
    lane = _of(family, rules.lane, MAX_TRUSTED)
    flagged = _of(family, rules.flagged, MAX_SOURCES)
    bare = len(program(family, replace(rules, flagged=[], lane=[]))) + 2
    room = (_optmem_max() // 2 - _CHARGE_BASE) // _CHARGE_PER_INSTRUCTION - bare
    most = max(0, room // _PER_SOURCE[family])
    while True:
        kept = lane[:most]
        fitted = replace(rules, lane=kept, flagged=flagged[:most - len(kept)])
        try:
            attach(sock, program(family, fitted))
            return
        except OSError as exc:
            if exc.errno != errno.ENOMEM or not most:
                raise  # the old filter stays
        most //= 2


def _optmem_max() -> int:
    try:
        with open(_OPTMEM_MAX) as file:
            return int(file.read())
    except (OSError, ValueError):
        return _OPTMEM_DEFAULT


def detach(sock: socket.socket) -> None:
    """Remove the socket's filter, if it has one."""
    with contextlib.suppress(FileNotFoundError):  # ENOENT: none attached
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
