"""The cross-platform userspace API text protocol (what ``wg`` speaks), sans-IO.

``SetParser`` (or ``parse_set`` for a whole body) turns the lines of a ``set=1`` request
into one ``DeviceChange`` (so the device can apply it atomically). The reply to ``get=1``
is rendered here in wireguard-go's key order (``device_lines``, ``peer_lines``,
``counter_lines``) as ``Device.get_steps`` takes its snapshot, and sent in pieces
(``get_pieces``; ``format_get`` for the whole). See https://www.wireguard.com/xplatform/.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from uspan.wg import prefix
from uspan.wg.allowedips import PrefixTexts, render_lines
from uspan.wg.config import ConfigError, DeviceChange, PeerChange, Prefix
from uspan.wg.constants import KEY_SIZE, ZERO_KEY
from uspan.wg.endpoint import Endpoint, EndpointError

if TYPE_CHECKING:
    from uspan.wg.device import Device

_DEVICE_KEYS = frozenset({"private_key", "listen_port", "fwmark", "replace_peers"})
_ALLOWED, _REMOVED = b"allowed_ip=", b"allowed_ip=-"
_PYTHON_SHARE = 8  # feed_bytes parses lines // 8 of the lines asked for in Python


def parse_set(lines: list[str]) -> DeviceChange:
    """Parse the body of a ``set=1`` request (without the terminating blank line)."""
    parser = SetParser()
    parser.feed(lines)
    return parser.finish()


class SetParser:
    """The body of a ``set=1`` request, fed a batch of lines at a time as it arrives.

    Device keys come first; each ``public_key=`` starts a peer and the keys after it
    belong to that peer. ``feed`` raises ConfigError naming the key (values of secret keys
    are never echoed); a line without ``=`` is a protocol error (errno EPROTO). Each line
    costs O(1): a peer's ``allowed_ip`` lines are kept as a list of additions and a dict
    of removals that no later addition cancelled, so a request of any size parses in time
    linear in its length, and applying additions, then removals, has the lines' effect.
    """

    def __init__(self) -> None:
        self._change = DeviceChange()
        self._peer: PeerChange | None = None
        self._adds: list[Prefix] = []
        self._removes: dict[Prefix, None] = {}

    def feed_bytes(self, data: bytes, pos: int, lines: int) -> int:
        """Parse about ``lines`` lines of ``data`` (whole lines, each ending in a
        newline) from ``pos``; return where the next ones start. A run of IPv4
        ``allowed_ip=`` lines is read in C (``prefix.scan``); other lines go to ``feed``,
        with the same result, at most ``lines // 8`` of them (they cost more)."""
        if self._peer is not None and data.startswith(_ALLOWED, pos):
            removing = data.startswith(_REMOVED, pos)
            run, end = prefix.scan(data, pos, lines, _REMOVED if removing else _ALLOWED)
            if run:
                if removing:
                    self._removes.update(dict.fromkeys(run))
                else:
                    removes = self._removes
                    for added in removes.keys() & run if removes else ():
                        del removes[added]
                    self._adds += run
                return end
        # Other lines, up to the next allowed_ip line (IPv4 ones are scanned there), or
        # a batch of allowed_ip lines scan does not read (IPv6 ones). In Python a line
        # costs 2-5 us, 20-50 times a scanned one: an eighth as many (256 lines of mesh
        # peers' keys and endpoints held the loop 1-2 ms between two looks at the clock).
        stop_at_allowed = not data.startswith(_ALLOWED, pos)
        end = pos
        for _ in range(max(1, lines // _PYTHON_SHARE)):
            end = data.find(b"\n", end) + 1
            if end <= 0 or (stop_at_allowed and data.startswith(_ALLOWED, end)):
                break
        end = end if end > 0 else len(data)
        text = data[pos:end].decode("utf-8", errors="replace")
        self.feed(text.removesuffix("\n").split("\n"))
        return end

    def feed(self, lines: list[str]) -> None:
        """Parse ``lines`` (str, without newlines)."""
        peer, adds, removes = self._peer, self._adds, self._removes
        # The loop over allowed_ip lines is the hot path of other requests: inlined.
        parse = prefix.parse
        for line in lines:
            key, sep, value = line.partition("=")
            if key == "allowed_ip" and sep and peer is not None:
                try:
                    if value.startswith("-"):
                        removes[parse(value[1:])] = None
                    else:
                        added = parse(value)
                        if removes:
                            removes.pop(added, None)
                        adds.append(added)
                except ValueError as exc:
                    raise ConfigError(key, str(exc)) from None
            else:
                self._line(line, key, sep, value)
                peer, adds, removes = self._peer, self._adds, self._removes

    def finish(self) -> DeviceChange:
        """The whole change (the parser is spent)."""
        self._close_peer()
        return self._change

    def _line(self, line: str, key: str, sep: str, value: str) -> None:
        if not sep:
            raise ConfigError("line", f"{line[:64]!r} is not key=value", errno.EPROTO)
        if key == "public_key":
            self._close_peer()
            self._peer = PeerChange(public_key=_parse_key(key, value, secret=False))
            self._change.peers.append(self._peer)
        elif self._peer is None:
            _device_line(self._change, key, value)
        elif key == "replace_allowed_ips":
            # What came before for this peer is replaced: only later lines count.
            self._peer.replace_allowed_ips = _parse_true(key, value)
            self._adds.clear()
            self._removes.clear()
        else:
            _peer_line(self._peer, key, value)

    def _close_peer(self) -> None:
        if self._peer is not None:
            self._peer.allowed_ips = self._adds
            self._peer.remove_allowed_ips = list(self._removes)
            self._adds, self._removes = [], {}


def _device_line(change: DeviceChange, key: str, value: str) -> None:
    if key == "private_key":
        change.private_key = _parse_key(key, value, secret=True)
    elif key == "listen_port":
        change.listen_port = _parse_uint(key, value, 0xFFFF)
    elif key == "fwmark":
        change.fwmark = _parse_uint(key, value, 0xFFFFFFFF)
    elif key == "replace_peers":
        change.replace_peers = _parse_true(key, value)
    else:
        raise ConfigError(key[:64], "not a device key (expected private_key, listen_port, "
                          "fwmark, replace_peers or public_key)")


def _peer_line(peer: PeerChange, key: str, value: str) -> None:
    if key == "remove":
        peer.remove = _parse_true(key, value)
    elif key == "update_only":
        peer.update_only = _parse_true(key, value)
    elif key == "preshared_key":
        peer.preshared_key = _parse_key(key, value, secret=True)
    elif key == "endpoint":
        try:
            peer.endpoint = Endpoint.parse(value)
        except EndpointError as exc:
            raise ConfigError(key, str(exc)) from None
    elif key == "persistent_keepalive_interval":
        peer.persistent_keepalive = _parse_uint(key, value, 0xFFFF)
    elif key == "protocol_version":
        if value != "1":
            raise ConfigError(key, f"{value[:64]!r} is not supported (only 1)")
        peer.protocol_version = 1
    elif key in _DEVICE_KEYS:
        raise ConfigError(key, "is a device key but appears after public_key")
    else:
        raise ConfigError(key[:64], "not a peer key")


def _parse_key(key: str, value: str, *, secret: bool) -> bytes:
    if len(value) == 2 * KEY_SIZE and value.isalnum():
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    shown = "value" if secret else repr(value[:80])
    raise ConfigError(key, f"{shown} is not {KEY_SIZE * 2} hex characters")


def _parse_uint(key: str, value: str, maximum: int) -> int:
    if value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= maximum:
        return int(value)
    raise ConfigError(key, f"{value[:64]!r} is not an integer from 0 to {maximum}")


def _parse_true(key: str, value: str) -> bool:
    if value != "true":
        raise ConfigError(key, f"{value[:64]!r} is not 'true'")
    return True


def format_get(device: Device) -> str:
    """The full reply to ``get=1``, ending with ``errno=0`` and the blank line."""
    parts: GetParts = []
    for _ in device.get_steps(parts):
        pass
    return b"".join(get_pieces(parts)).decode()


GET_PIECE_LINES = 256  # allowed_ip lines per piece of get_pieces (~0.25 ms to render)
GET_PIECE_BYTES = 4096  # rendered text a piece at least (a dozen peers of one prefix)
# A get's snapshot (``Device.get_steps``): text rendered already, and the allowed IPs of
# peers with too many of them to render at once (``allowedips.PrefixTexts``).
GetParts = list[bytes | PrefixTexts]


def get_pieces(parts: GetParts) -> Iterator[bytes]:
    """The reply to ``get=1`` in pieces of about GET_PIECE_BYTES, so a shell can send a
    huge reply (a peer with a million allowed IPs) between other work. A big peer's
    allowed IPs are rendered GET_PIECE_LINES at a time as the pieces are made, or come
    as the lines their owner kept (``allowedips.PrefixTexts``): a kept segment is a
    piece of its own, sent as it is."""
    out: list[bytes] = []
    size = 0
    for kept, text in _texts(parts):
        if kept:  # a whole segment's lines already (one of exactly that many is copied)
            if out:
                yield b"".join(out)
                out.clear()
                size = 0
            yield text
            continue
        out.append(text)
        size += len(text)
        if size >= GET_PIECE_BYTES:
            yield b"".join(out)
            out.clear()
            size = 0
    out.append(b"errno=0\n\n")
    yield b"".join(out)


def _texts(parts: GetParts) -> Iterator[tuple[bool, bytes]]:
    """Each part's text: (whether it is lines kept whole, the bytes)."""
    for part in parts:
        if isinstance(part, bytes):
            yield False, part
            continue
        for count, lines in part.lines(GET_PIECE_LINES):
            yield count > GET_PIECE_LINES, lines


def device_lines(private_key: bytes | None, listen_port: int, fwmark: int) -> bytes:
    """The device's lines of ``get=1`` (each only if set)."""
    head = []
    if private_key is not None and private_key != ZERO_KEY:
        head.append(f"private_key={private_key.hex()}\n")
    if listen_port:
        head.append(f"listen_port={listen_port}\n")
    if fwmark:
        head.append(f"fwmark={fwmark}\n")
    return "".join(head).encode()


def peer_lines(public_key: bytes, preshared_key: bytes, endpoint: Endpoint | None,
               keepalive: int, allowed_ips: Sequence[str]) -> tuple[bytes, bytes]:
    """A peer's lines of ``get=1`` that only a set or a roam changes: those before its
    counters (keys, protocol version, endpoint) and those after (keepalive, then these
    allowed IPs), in wireguard-go's key order."""
    endpoint_line = "" if endpoint is None else f"endpoint={endpoint}\n"
    head = (f"public_key={public_key.hex()}\n"
            f"preshared_key={preshared_key.hex()}\n"
            f"protocol_version=1\n{endpoint_line}").encode()
    tail = f"persistent_keepalive_interval={keepalive}\n".encode()
    return head, tail + render_lines(allowed_ips)


_NEVER = b"last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
_HANDSHAKE = b"last_handshake_time_sec=%d\nlast_handshake_time_nsec=%d\n"
_BYTES = b"tx_bytes=%d\nrx_bytes=%d\n"


def counter_lines(last_handshake_wall: float | None, tx_bytes: int, rx_bytes: int) -> bytes:
    """A peer's lines of ``get=1`` that traffic changes: its last handshake's time and its
    byte counters."""
    if last_handshake_wall is None or last_handshake_wall <= 0:
        return _NEVER + _BYTES % (tx_bytes, rx_bytes)
    seconds = int(last_handshake_wall)
    nanoseconds = min(round((last_handshake_wall - seconds) * 1e9), 999_999_999)
    return _HANDSHAKE % (seconds, nanoseconds) + _BYTES % (tx_bytes, rx_bytes)


def format_errno(code: int) -> str:
    """The reply to a failed operation: ``errno=-<code>`` and the blank line."""
    return f"errno={-abs(code)}\n\n"
