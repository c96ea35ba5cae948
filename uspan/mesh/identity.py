"""The node's persistent identity: node ID and WireGuard key pair, in the state directory.

Created on first start, reused on every later one: peers know the node by its key and
discovery by its node ID, so losing either would make it a stranger. A file that exists
but cannot be read is an error naming the file, never a reason to make a new identity.
Files are 0600, written atomically (temp file, fsync, rename, fsync of the directory); a
directory this module creates is 0700 (an existing one is the operator's choice).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from uspan import atomicfile, userpaths
from uspan.wg import crypto

NODE_IDENTITY_FILE = "node-identity.yaml"
KUBESPAN_IDENTITY_FILE = "kubespan-identity.yaml"
NODE_ID_BYTES = 32
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NODE_ID_LENGTH = 43  # ceil(256 / log2(62)): every 32-byte value fits

Rng = Callable[[int], bytes]


class IdentityError(Exception):
    """An identity file is unreadable or corrupted; the message names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True, slots=True)
class Identity:
    """Node ID and WireGuard key pair; the private key never shows in repr or logs."""

    node_id: str
    private_key: bytes = field(repr=False)

    @property
    def public_key(self) -> bytes:
        return crypto.public_key(self.private_key)

    def __repr__(self) -> str:
        public = base64.b64encode(self.public_key).decode()
        return f"Identity(node_id={self.node_id!r}, public_key={public!r}, private_key=(redacted))"

    __str__ = __repr__


def base62(data: bytes) -> str:
    """Fixed-width base62 of a 32-byte value (the node ID's text form)."""
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits)).rjust(NODE_ID_LENGTH, BASE62[0])


def load_or_create(state_dir: Path, rng: Rng = os.urandom) -> Identity:
    """Read the identity from ``state_dir``, creating whatever part is missing."""
    if not state_dir.exists():
        userpaths.private_dir(state_dir)  # 0700, its new parents too
    node_path = state_dir / NODE_IDENTITY_FILE
    key_path = state_dir / KUBESPAN_IDENTITY_FILE
    node_id = _read_field(node_path, "nodeId")
    if node_id is None:
        node_id = base62(rng(NODE_ID_BYTES))
        _write_atomically(node_path, {"nodeId": node_id})
    elif len(node_id) != NODE_ID_LENGTH or not set(node_id) <= set(BASE62):
        raise IdentityError(node_path, f"nodeId must be {NODE_ID_LENGTH} base62 characters")
    key_text = _read_field(key_path, "privateKey")
    if key_text is None:
        private_key = crypto.clamp(rng(32))
        _write_atomically(key_path, {"privateKey": base64.b64encode(private_key).decode()})
    else:
        try:
            private_key = base64.b64decode(key_text, validate=True)
        except ValueError as exc:  # binascii.Error, or non-ASCII text (fuzz/config.py)
            raise IdentityError(key_path, "privateKey is not base64") from exc
        if len(private_key) != 32:
            raise IdentityError(key_path, f"privateKey must be 32 bytes, got {len(private_key)}")
    return Identity(node_id=node_id, private_key=private_key)


def _read_field(path: Path, name: str) -> str | None:
    """The one string field of an identity file, or None when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(path, f"cannot be read ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise IdentityError(path, "is not valid YAML (corrupted?)") from exc
    if not isinstance(data, dict) or not isinstance(data.get(name), str):
        raise IdentityError(path, f"has no {name} string (corrupted?)")
    value: str = data[name]
    return value


def _write_atomically(path: Path, data: dict[str, str]) -> None:
    atomicfile.write(path, yaml.safe_dump(data).encode())
