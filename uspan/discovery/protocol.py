"""The discovery wire format: length-prefixed msgpack frames, typed requests and replies.

A frame is a 4-byte big-endian length N (1 <= N <= MAX_FRAME) and N bytes of msgpack that
decode to a map with string keys. Everything here is sans-IO: ``FrameDecoder`` takes bytes
and returns whole messages, ``parse_request`` turns a message into a typed request. Any
violation raises ``ProtocolError``, after which the peer is not trusted to be in sync and
the connection is closed. Limits on sizes (IDs, blobs, TTL) are the store's business, not
the codec's: a well-formed request that breaks one gets an error reply and the connection
lives on. docs/discovery-protocol.md is the reference; keep the two in step.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_FRAME = 65536  # bytes of msgpack per frame; a full affiliate record is about 4.5 KiB
HEADER = struct.Struct(">I")
NONCE_SIZE = 32
KEY_SIZE = 32  # Ed25519 public key
SIG_SIZE = 64
MAX_REQUEST_ID = 2**32 - 1
MAX_SEQ = 2**64 - 1
MAX_ENDPOINTS_ON_WIRE = 256  # codec sanity bound; the store's limit (64) is lower

OPS = ("hello", "update", "delete", "list", "watch")
SIGNED_OPS = ("update", "delete", "list", "watch")

# Error codes. Connection-level codes (FATAL) close the connection after the reply.
E_BAD_FRAME = "bad_frame"
E_FRAME_TOO_LARGE = "frame_too_large"
E_BAD_MESSAGE = "bad_message"
E_UNKNOWN_OP = "unknown_op"
E_UNSUPPORTED_VERSION = "unsupported_version"
E_HELLO_REQUIRED = "hello_required"
E_TIMEOUT = "timeout"
E_TOO_MANY_CONNECTIONS = "too_many_connections"
E_OUTBOX_FULL = "outbox_full"
FATAL = frozenset(
    {
        E_BAD_FRAME,
        E_FRAME_TOO_LARGE,
        E_BAD_MESSAGE,
        E_UNKNOWN_OP,
        E_UNSUPPORTED_VERSION,
        E_HELLO_REQUIRED,
        E_TIMEOUT,
        E_TOO_MANY_CONNECTIONS,
        E_OUTBOX_FULL,
    }
)
# Request-level codes: an error reply, the connection stays.
E_BAD_PROOF = "bad_proof"
E_PROOF_MISMATCH = "proof_mismatch"
E_REPLAYED = "replayed"
E_RATE_LIMITED = "rate_limited"
E_WATCH_ACTIVE = "watch_active"
E_WATCH_OVERFLOW = "watch_overflow"  # the watch ended: re-subscribe
E_CLUSTER_EXPIRED = "cluster_expired"  # the watch ended: re-subscribe
E_BACKEND_UNAVAILABLE = "backend_unavailable"
E_STORAGE_FAILED = "storage_failed"
E_LIMIT_CLUSTER_ID = "limit_cluster_id"
E_LIMIT_AFFILIATE_ID = "limit_affiliate_id"
E_LIMIT_DATA = "limit_data"
E_LIMIT_ENDPOINT = "limit_endpoint"
E_LIMIT_ENDPOINTS = "limit_endpoints"
E_LIMIT_AFFILIATES = "limit_affiliates"
E_LIMIT_TTL = "limit_ttl"
E_LIMIT_CLUSTERS = "limit_clusters"
# Codes after which a client should retry (after a backoff), the rest are final.
RETRYABLE = frozenset(
    {
        E_RATE_LIMITED,
        E_WATCH_OVERFLOW,
        E_CLUSTER_EXPIRED,
        E_BACKEND_UNAVAILABLE,
        E_STORAGE_FAILED,
        E_TIMEOUT,
        E_TOO_MANY_CONNECTIONS,
        E_OUTBOX_FULL,
    }
)


class ProtocolError(Exception):
    """The byte stream or a message broke the protocol; ``code`` is one of FATAL."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- framing ------------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    """One frame: the length prefix and the msgpack body. Refuses to build an oversized one."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(E_FRAME_TOO_LARGE, f"{len(body)} bytes > MAX_FRAME {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


_ID_KEY: bytes = msgpack.packb("id")
_OK_TRUE: bytes = msgpack.packb("ok") + msgpack.packb(True)


@dataclass(frozen=True, slots=True)
class Packed:
    """A reply's fields encoded once, for many watchers: only the id differs."""

    fields: bytes
    count: int

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Packed:
        if len(fields) > 13:
            raise ValueError("a packed reply fits a fixmap: at most 13 fields")
        packed = b"".join(
            msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in fields.items()
        )
        return cls(packed, len(fields))

    def frame(self, rid: int) -> bytes:
        """The frame of ``ok(rid, **fields)``, without encoding the fields again."""
        rid_packed: bytes = msgpack.packb(rid)
        body = bytes([0x80 | (self.count + 2)]) + _ID_KEY + rid_packed + _OK_TRUE + self.fields
        if len(body) > MAX_FRAME:
            raise ProtocolError(E_FRAME_TOO_LARGE, f"{len(body)} bytes > MAX_FRAME {MAX_FRAME}")
        return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """A frame body as a map with string keys, or ProtocolError."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise ProtocolError(E_BAD_FRAME, f"undecodable msgpack ({type(e).__name__})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ProtocolError(E_BAD_MESSAGE, "a frame must hold a map with string keys")
    return obj


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get the complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    @property
    def partial(self) -> bool:
        """True while a frame has begun but not ended (the read timeout watches this)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        return list(self._frames())

    def _frames(self) -> Iterator[dict[str, Any]]:
        buf = self._buffer
        while len(buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(buf)
            if length == 0 or length > self._max:
                raise ProtocolError(
                    E_FRAME_TOO_LARGE if length else E_BAD_FRAME,
                    f"frame length {length} outside 1..{self._max}",
                )
            end = HEADER.size + length
            if len(buf) < end:
                return
            body = bytes(buf[HEADER.size : end])
            del buf[:end]
            yield decode_body(body)


# --- typed requests -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proof:
    """Who signs (the cluster's public key), in which order (seq), and the signature."""

    key: bytes
    seq: int
    sig: bytes


@dataclass(frozen=True, slots=True)
class Hello:
    id: int
    version: int


@dataclass(frozen=True, slots=True)
class Update:
    id: int
    cluster: str
    proof: Proof
    affiliate: str
    data: bytes | None
    endpoints: tuple[bytes, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class Delete:
    id: int
    cluster: str
    proof: Proof
    affiliate: str


@dataclass(frozen=True, slots=True)
class List:
    id: int
    cluster: str
    proof: Proof


@dataclass(frozen=True, slots=True)
class Watch:
    id: int
    cluster: str
    proof: Proof


Request = Hello | Update | Delete | List | Watch
ClusterRequest = Update | Delete | List | Watch


def _field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in msg:
        raise ProtocolError(E_BAD_MESSAGE, f"missing field {name!r}")
    value = msg[name]
    # bool is an int in Python, never a valid int here
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(E_BAD_MESSAGE, f"field {name!r} has the wrong type")
    return value


def _uint(msg: dict[str, Any], name: str, maximum: int) -> int:
    value: int = _field(msg, name, int)
    if not 0 <= value <= maximum:
        raise ProtocolError(E_BAD_MESSAGE, f"field {name!r} outside 0..{maximum}")
    return value


def _bin(msg: dict[str, Any], name: str, size: int) -> bytes:
    value: bytes = _field(msg, name, bytes)
    if len(value) != size:
        raise ProtocolError(E_BAD_MESSAGE, f"field {name!r} must be {size} bytes")
    return value


def request_id(msg: dict[str, Any]) -> int:
    """The request's id when it has a valid one, else 0 (for the error reply)."""
    value = msg.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_REQUEST_ID:
        return value
    return 0


def parse_request(msg: dict[str, Any]) -> Request:
    """A decoded message as a typed request, or ProtocolError naming what is wrong."""
    op = _field(msg, "op", str)
    rid = _uint(msg, "id", MAX_REQUEST_ID)
    if rid == 0:
        raise ProtocolError(E_BAD_MESSAGE, "field 'id' must be at least 1")
    if op == "hello":
        return Hello(rid, _uint(msg, "version", MAX_REQUEST_ID))
    if op not in SIGNED_OPS:
        raise ProtocolError(E_UNKNOWN_OP, f"unknown op {op[:32]!r}")
    cluster: str = _field(msg, "cluster", str)
    proof = Proof(
        _bin(msg, "key", KEY_SIZE), _uint(msg, "seq", MAX_SEQ), _bin(msg, "sig", SIG_SIZE)
    )
    if op == "list":
        return List(rid, cluster, proof)
    if op == "watch":
        return Watch(rid, cluster, proof)
    affiliate: str = _field(msg, "affiliate", str)
    if op == "delete":
        return Delete(rid, cluster, proof, affiliate)
    data = msg.get("data")
    if data is not None and not isinstance(data, bytes):
        raise ProtocolError(E_BAD_MESSAGE, "field 'data' must be bin or nil")
    endpoints = _field(msg, "endpoints", list)
    if len(endpoints) > MAX_ENDPOINTS_ON_WIRE or not all(isinstance(e, bytes) for e in endpoints):
        raise ProtocolError(E_BAD_MESSAGE, "field 'endpoints' must be an array of bin")
    ttl = _uint(msg, "ttl", MAX_REQUEST_ID)
    return Update(rid, cluster, proof, affiliate, data, tuple(endpoints), ttl)


def request_message(request: Request) -> dict[str, Any]:
    """The wire map of a typed request (the client's side of ``parse_request``)."""
    if isinstance(request, Hello):
        return {"op": "hello", "id": request.id, "version": request.version}
    msg: dict[str, Any] = {
        "op": op_name(request),
        "id": request.id,
        "cluster": request.cluster,
        "key": request.proof.key,
        "seq": request.proof.seq,
        "sig": request.proof.sig,
    }
    if isinstance(request, Update | Delete):
        msg["affiliate"] = request.affiliate
    if isinstance(request, Update):
        msg["data"] = request.data
        msg["endpoints"] = list(request.endpoints)
        msg["ttl"] = request.ttl
    return msg


def op_name(request: Request) -> str:
    return type(request).__name__.lower()


# --- replies and events -------------------------------------------------------------------


def ok(rid: int, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, **fields}


def error(rid: int, code: str, message: str, **fields: Any) -> dict[str, Any]:
    """An error reply; ``fatal`` tells the client the connection is being closed."""
    return {
        "id": rid,
        "ok": False,
        "code": code,
        "message": message,
        "fatal": code in FATAL,
        **fields,
    }


def affiliate_record(
    affiliate_id: str, data: bytes | None, endpoints: list[bytes]
) -> dict[str, Any]:
    return {"id": affiliate_id, "data": data, "endpoints": endpoints}


def record_size(record: dict[str, Any]) -> int:
    """An upper bound of a record's msgpack size, to fill frames without re-encoding."""
    data = record["data"]
    return (
        32
        + len(record["id"].encode())
        + (len(data) if data else 0)
        + sum(len(e) + 2 for e in record["endpoints"])
    )


def chunk_records(records: list[dict[str, Any]], budget: int = MAX_FRAME - 256) -> list[list[Any]]:
    """Split affiliate records into groups that each fit one frame (at least one group)."""
    groups: list[list[Any]] = [[]]
    used = 0
    for record in records:
        size = record_size(record)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(record)
        used += size
    return groups
