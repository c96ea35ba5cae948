"""What the service stores is sealed under the cluster secret: it sees only opaque blobs.

Keys: HKDF-SHA256 of the cluster secret, one ``info`` label per purpose, so a key never
serves two constructions.

Data (<= 2048 bytes on the wire): AES-256-GCM, a random 12-byte nonce, the affiliate ID
as associated data (the service cannot present one member's record as another's).
Blob = nonce || ciphertext || tag, so plaintext may be up to 2048 - 28 bytes.

Endpoints must be sealed deterministically, so the service can merge and de-duplicate
them without reading them, and must fit the 32-byte blob limit. AES-SIV's 16-byte tag
makes an IPv6 endpoint (18 bytes) 34 bytes, too big. We use the SIV construction
(Rogaway-Shrimpton deterministic authenticated encryption) with a 96-bit synthetic IV:

    p   = IPv6 or IPv4-mapped address (16) || port (2, big-endian)   -- always 18 bytes
    iv  = HMAC-SHA256(K_mac, "uspan-endpoint-v1" 0x00 || u16 len(aff) || aff || p)[:12]
    c   = AES-256-CTR(K_enc, counter block iv || 0x00000000) XOR p
    blob = iv || c                                                      -- 30 bytes

Opening decrypts with the IV and recomputes it; a mismatch is a forgery. As for any DAE,
equal plaintexts give equal blobs (that is the point) and nothing else leaks: the fixed
18-byte form even hides IPv4 from IPv6. A forgery succeeds with probability 2^-96 per try,
ample for a registry that any refused request costs a rate-limit token. CTR uses two
blocks per IV, so the 32-bit counter never wraps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GCM_NONCE = 12
GCM_TAG = 16
DATA_OVERHEAD = GCM_NONCE + GCM_TAG
MAX_DATA_BLOB = 2048
MAX_DATA_PLAINTEXT = MAX_DATA_BLOB - DATA_OVERHEAD
SIV_SIZE = 12
ENDPOINT_PLAINTEXT = 18
ENDPOINT_BLOB = SIV_SIZE + ENDPOINT_PLAINTEXT  # 30 <= 32
_ENDPOINT_LABEL = b"uspan-endpoint-v1\x00"
_DATA_LABEL = b"uspan-data-v1\x00"


class SealError(ValueError):
    """A blob does not open under this secret (wrong secret, corrupt, or forged)."""


def derive_key(secret: bytes, purpose: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256(secret, info=purpose): independent keys from one cluster secret."""
    if not secret:
        raise ValueError("the cluster secret is empty")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose).derive(secret)


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


class Sealer:
    """Seals and opens the blobs of one cluster (one secret)."""

    def __init__(self, cluster_secret: bytes) -> None:
        self._gcm = AESGCM(derive_key(cluster_secret, b"uspan discovery data v1"))
        self._mac_key = derive_key(cluster_secret, b"uspan discovery endpoint mac v1")
        self._enc_key = derive_key(cluster_secret, b"uspan discovery endpoint enc v1")

    # data ---------------------------------------------------------------------------------

    def seal_data(self, affiliate_id: str, plaintext: bytes) -> bytes:
        if len(plaintext) > MAX_DATA_PLAINTEXT:
            raise ValueError(f"data of {len(plaintext)} bytes > {MAX_DATA_PLAINTEXT}")
        nonce = os.urandom(GCM_NONCE)
        return nonce + self._gcm.encrypt(nonce, plaintext, _DATA_LABEL + affiliate_id.encode())

    def open_data(self, affiliate_id: str, blob: bytes) -> bytes:
        if len(blob) < DATA_OVERHEAD:
            raise SealError(f"data blob of {len(blob)} bytes is shorter than its overhead")
        try:
            return self._gcm.decrypt(
                blob[:GCM_NONCE], blob[GCM_NONCE:], _DATA_LABEL + affiliate_id.encode()
            )
        except InvalidTag:
            raise SealError("data blob does not open under this cluster secret") from None

    # endpoints ----------------------------------------------------------------------------

    def _siv(self, affiliate_id: str, plaintext: bytes) -> bytes:
        msg = _ENDPOINT_LABEL + _lp(affiliate_id.encode()) + plaintext
        return hmac.new(self._mac_key, msg, hashlib.sha256).digest()[:SIV_SIZE]

    def _ctr(self, iv: bytes, data: bytes) -> bytes:
        cipher = Cipher(algorithms.AES(self._enc_key), modes.CTR(iv + bytes(4)))
        enc = cipher.encryptor()
        return enc.update(data) + enc.finalize()

    def seal_endpoint(self, affiliate_id: str, ip: str, port: int) -> bytes:
        """A 30-byte blob; the same endpoint of the same affiliate always gives the same."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} outside 0..65535")
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv4Address):
            address = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
        plaintext = address.packed + struct.pack(">H", port)
        iv = self._siv(affiliate_id, plaintext)
        return iv + self._ctr(iv, plaintext)

    def open_endpoint(self, affiliate_id: str, blob: bytes) -> tuple[str, int]:
        """(ip, port) of a blob; IPv4-mapped addresses come back as IPv4 text."""
        if len(blob) != ENDPOINT_BLOB:
            raise SealError(f"endpoint blob of {len(blob)} bytes, expected {ENDPOINT_BLOB}")
        iv = blob[:SIV_SIZE]
        plaintext = self._ctr(iv, blob[SIV_SIZE:])
        if not hmac.compare_digest(iv, self._siv(affiliate_id, plaintext)):
            raise SealError("endpoint blob does not open under this cluster secret")
        address = ipaddress.IPv6Address(plaintext[:16])
        (port,) = struct.unpack(">H", plaintext[16:])
        ip = address.ipv4_mapped or address
        return str(ip), port
