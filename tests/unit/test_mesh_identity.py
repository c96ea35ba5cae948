import base64
import stat
from pathlib import Path

import pytest

from uspan.mesh.identity import (
    KUBESPAN_IDENTITY_FILE,
    NODE_ID_LENGTH,
    NODE_IDENTITY_FILE,
    IdentityError,
    base62,
    load_or_create,
)
from uspan.wg import crypto


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_with_safe_modes_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create(state)
    assert mode(state) == 0o700
    assert mode(state / NODE_IDENTITY_FILE) == 0o600
    assert mode(state / KUBESPAN_IDENTITY_FILE) == 0o600
    assert len(first.node_id) == NODE_ID_LENGTH
    assert first.public_key == crypto.public_key(first.private_key)
    again = load_or_create(state)
    assert again == first
    assert sorted(p.name for p in state.iterdir()) == [KUBESPAN_IDENTITY_FILE, NODE_IDENTITY_FILE]


def test_rng_is_injectable(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path / "s", rng=lambda n: bytes([7]) * n)
    assert identity.node_id == base62(bytes([7]) * 32)
    assert identity.private_key == crypto.clamp(bytes([7]) * 32)


def test_private_key_is_redacted(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path / "s")
    secret = base64.b64encode(identity.private_key).decode()
    assert secret not in repr(identity)
    assert secret not in str(identity)
    assert identity.private_key.hex() not in repr(identity)
    assert "redacted" in repr(identity)


def test_missing_key_file_is_created_alone(tmp_path: Path) -> None:
    state = tmp_path / "s"
    first = load_or_create(state)
    (state / KUBESPAN_IDENTITY_FILE).unlink()
    second = load_or_create(state)
    assert second.node_id == first.node_id
    assert second.private_key != first.private_key


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        (NODE_IDENTITY_FILE, "nodeId: [unterminated\n", "YAML"),
        (NODE_IDENTITY_FILE, "other: 1\n", "nodeId"),
        (NODE_IDENTITY_FILE, "nodeId: short\n", "base62"),
        (NODE_IDENTITY_FILE, "", "nodeId"),
        (KUBESPAN_IDENTITY_FILE, "privateKey: '!!!'\n", "base64"),
        (KUBESPAN_IDENTITY_FILE, "privateKey: AAAA\n", "32 bytes"),
        (KUBESPAN_IDENTITY_FILE, "privateKey: 5\n", "privateKey"),
    ],
)
def test_corrupted_file_is_an_error_naming_it(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    state = tmp_path / "s"
    load_or_create(state)
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    (state / name).write_text(content)
    with pytest.raises(IdentityError, match=problem) as info:
        load_or_create(state)
    assert info.value.path == state / name
    assert name in str(info.value)
    other = KUBESPAN_IDENTITY_FILE if name == NODE_IDENTITY_FILE else NODE_IDENTITY_FILE
    assert (state / other).read_bytes() == before[other]  # nothing was regenerated


def test_unreadable_bytes(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    (state / NODE_IDENTITY_FILE).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(IdentityError, match=NODE_IDENTITY_FILE):
        load_or_create(state)


def test_base62_is_fixed_width() -> None:
    assert base62(bytes(32)) == "0" * NODE_ID_LENGTH
    assert len(base62(b"\xff" * 32)) == NODE_ID_LENGTH
    assert base62((61).to_bytes(32, "big")).endswith("0z")


def test_reads_a_talos_kubespan_identity_file(tmp_path: Path) -> None:
    """Talos writes address, subnet and both keys; the private key is what counts."""
    state = tmp_path / "s"
    state.mkdir()
    (state / KUBESPAN_IDENTITY_FILE).write_text(
        'address: ""\nsubnet: ""\n'
        "privateKey: sF45u5ePau58WeeCUY3T8D9foEKaQ8Opx4cGC8g4XE4=\n"
        "publicKey: Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE=\n"
    )
    identity = load_or_create(state)
    assert base64.b64encode(identity.public_key).decode() == (
        "Oak2fBEWngBhwslBxDVgnRNHXs88OAp4kjroSX0uqUE="
    )
