"""Fixtures shared by the unit tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

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


@pytest.fixture
def default_stop_actions() -> Iterator[None]:
    """SIGINT and SIGTERM at their default actions for the test, as in an interactive
    shell: a runner that starts the suite with ``&`` from a script hands it SIGINT
    ignored, which uspan rightly keeps (and passes on to the programs it starts)."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
