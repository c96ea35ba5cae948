"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from uspan.wg import aead_py, transport_crypto


@pytest.fixture(params=["compiled", "python"])
def transport_aead(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on each transport AEAD: sessions made during it use that one."""
    if request.param == "python":
        monkeypatch.setattr(transport_crypto, "Sealer", aead_py.Sealer)
        monkeypatch.setattr(transport_crypto, "Opener", aead_py.Opener)
        monkeypatch.setattr(transport_crypto, "strip", aead_py.strip)
        monkeypatch.setattr(transport_crypto, "inner_runs", aead_py.inner_runs)
        monkeypatch.setattr(transport_crypto, "transport_runs", aead_py.transport_runs)
    elif not transport_crypto.COMPILED:
        pytest.skip("uspan.wg._aead was not built (test_transport_crypto fails if required)")
    return str(request.param)
