"""The transport AEAD: the compiled batch module when it was built, else pyca's.

``Sealer(key).seal(index, counter, packets, mtu)``, ``Opener(key).open(datagrams)`` and
``strip(plaintexts)`` (``uspan/wg/_aead.pyi``). ``COMPILED`` says which one runs; the tests set
USPAN_REQUIRE_COMPILED=1 so a build that silently fell back fails there.
"""

from __future__ import annotations

try:
    from uspan.wg._aead import Opener, Sealer, strip
    COMPILED = True
except ImportError:  # built without a compiler or OpenSSL headers
    from uspan.wg.aead_py import Opener, Sealer, strip  # type: ignore[assignment]
    COMPILED = False

__all__ = ["COMPILED", "Opener", "Sealer", "strip"]
