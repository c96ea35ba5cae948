"""Proof of membership: only holders of the cluster secret may read or write a cluster.

Every member derives the same Ed25519 key pair from the secret:
seed = HKDF-SHA256(secret, info = "uspan discovery proof v1" 0x00 || cluster ID). The
service never sees the secret. It pins the public key on the cluster's first use and from
then on accepts a request for that cluster only with that key and a valid signature over
``proof_message``: the connection's server nonce (32 random bytes from hello), a sequence
number that must grow on the connection, and every field of the request. So a recorded
proof is worthless on another connection (other nonce) and on the same one (seq), and a
signature cannot be moved to other contents.

Threat model, for someone who knows the cluster ID but not the secret:
- they cannot list, watch, write or delete: every such request gets ``proof_mismatch`` and
  no data; they learn only that the cluster is in use (pinned);
- they can claim a cluster ID that no member has used yet (or whose pin lapsed), by being
  first. Members then get ``proof_mismatch``, a clear error, not a silently empty
  cluster. The claim is contained: a pin lapses once the cluster has had no affiliate for
  MAX_TTL (30 min); to hold it the squatter must keep an affiliate alive, and that cannot
  hide: it shows up as members' ``proof_mismatch`` errors. The remedy is a fresh cluster
  ID (the pin is keyed by the ID, and both the ID and the key are the cluster's, not the
  service's), which also keeps the squatter out of the new one;
- they can spend their own IP's rate-limit tokens and create clusters of their own, as
  anyone can; ``limit_clusters`` bounds the memory that costs.
The service itself (or whoever runs it) sees cluster IDs, affiliate IDs, blob sizes and
timing, never contents (see ``seal``). TLS is out of scope: on an untrusted path the
sealing protects contents and the proof protects access, but not availability.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from uspan.discovery.protocol import ClusterRequest, Proof, Update, op_name
from uspan.discovery.seal import derive_key

DOMAIN = b"uspan-discovery-proof-v1\x00"


class ProofError(ValueError):
    """A signature does not verify."""


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def proof_message(
    nonce: bytes,
    seq: int,
    op: str,
    cluster: str,
    affiliate: str = "",
    data: bytes | None = None,
    endpoints: tuple[bytes, ...] = (),
    ttl: int = 0,
) -> bytes:
    """The exact bytes signed: fields length-prefixed (u16), integers big-endian."""
    parts = [
        DOMAIN,
        nonce,
        struct.pack(">Q", seq),
        _lp(op.encode()),
        _lp(cluster.encode()),
        _lp(affiliate.encode()),
        b"\x00" if data is None else b"\x01" + _lp(data),
        struct.pack(">H", len(endpoints)),
        *(_lp(e) for e in endpoints),
        struct.pack(">I", ttl),
    ]
    return b"".join(parts)


def request_proof_message(nonce: bytes, request: ClusterRequest) -> bytes:
    """``proof_message`` of a parsed request (what the service verifies)."""
    affiliate = getattr(request, "affiliate", "")
    if isinstance(request, Update):
        return proof_message(
            nonce,
            request.proof.seq,
            "update",
            request.cluster,
            affiliate,
            request.data,
            request.endpoints,
            request.ttl,
        )
    return proof_message(nonce, request.proof.seq, op_name(request), request.cluster, affiliate)


class MemberKey:
    """The cluster's signing key, as every holder of the secret derives it."""

    def __init__(self, cluster_secret: bytes, cluster_id: str) -> None:
        seed = derive_key(cluster_secret, b"uspan discovery proof v1\x00" + cluster_id.encode())
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


def verify(public: bytes, message: bytes, signature: bytes) -> None:
    """Raise ProofError unless ``signature`` is ``public``'s over ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise ProofError("signature does not verify") from None


class ProofChecker:
    """One connection's side of the proof: its nonce and the highest seq seen."""

    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce
        self._last_seq = -1

    def check(self, request: ClusterRequest) -> Proof:
        """Verify signature and freshness; the caller then checks the key against the pin.

        Raises ProofError (bad signature) or ReplayError (seq not above the last one)."""
        proof = request.proof
        verify(proof.key, request_proof_message(self.nonce, request), proof.sig)
        if proof.seq <= self._last_seq:
            raise ReplayError(f"seq {proof.seq} is not above {self._last_seq}")
        self._last_seq = proof.seq
        return proof


class ReplayError(ProofError):
    """A valid signature with a seq already used on this connection."""
