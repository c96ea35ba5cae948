"""Membership proof: right secret, wrong secret, replayed or moved proofs."""

from __future__ import annotations

import os

import pytest

from uspan.discovery import protocol as p
from uspan.discovery.proof import MemberKey, ProofChecker, ProofError, ReplayError, proof_message
from uspan.discovery.store import LimitError, Store

SECRET = bytes(range(32))
NONCE = bytes(32)


def signed_update(key: MemberKey, nonce: bytes, seq: int, data: bytes = b"d") -> p.Update:
    message = proof_message(nonce, seq, "update", "c", "a", data, (b"e",), 60)
    return p.Update(1, "c", p.Proof(key.public, seq, key.sign(message)), "a", data, (b"e",), 60)


def test_members_derive_the_same_key_per_cluster() -> None:
    assert MemberKey(SECRET, "c").public == MemberKey(SECRET, "c").public
    assert MemberKey(SECRET, "c").public != MemberKey(SECRET, "d").public
    assert MemberKey(SECRET, "c").public != MemberKey(bytes(32), "c").public


def test_right_secret_verifies() -> None:
    checker = ProofChecker(NONCE)
    checker.check(signed_update(MemberKey(SECRET, "c"), NONCE, 1))
    checker.check(signed_update(MemberKey(SECRET, "c"), NONCE, 5))


def test_replayed_proof_refused() -> None:
    checker = ProofChecker(NONCE)
    request = signed_update(MemberKey(SECRET, "c"), NONCE, 3)
    checker.check(request)
    with pytest.raises(ReplayError):
        checker.check(request)
    with pytest.raises(ReplayError):
        checker.check(signed_update(MemberKey(SECRET, "c"), NONCE, 2))


def test_proof_from_another_connection_refused() -> None:
    request = signed_update(MemberKey(SECRET, "c"), os.urandom(32), 1)
    with pytest.raises(ProofError):
        ProofChecker(NONCE).check(request)


def test_signature_bound_to_contents() -> None:
    request = signed_update(MemberKey(SECRET, "c"), NONCE, 1)
    moved = p.Update(1, "c", request.proof, "a", b"other", request.endpoints, request.ttl)
    with pytest.raises(ProofError):
        ProofChecker(NONCE).check(moved)


def test_wrong_secret_cannot_use_a_pinned_cluster() -> None:
    store = Store()
    right, wrong = MemberKey(SECRET, "c"), MemberKey(bytes(32), "c")
    store.update("c", right.public, "a", b"d", (), 60, now=0.0)
    # a valid signature by the wrong key passes the checker but not the pin
    ProofChecker(NONCE).check(signed_update(wrong, NONCE, 1))
    for attempt in (
        lambda: store.authorize("c", wrong.public, 1.0),
        lambda: store.update("c", wrong.public, "b", b"x", (), 60, 1.0),
    ):
        with pytest.raises(LimitError) as caught:
            attempt()
        assert caught.value.code == p.E_PROOF_MISMATCH
    assert [r["id"] for r in store.records("c")] == ["a"]
    assert store.refusals[p.E_PROOF_MISMATCH] == 2
