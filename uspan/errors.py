"""Exceptions out of trio nurseries: the programs report the ones they expect in one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or ``error`` itself."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def expected(error: BaseException, *kinds: type[BaseException]) -> list[BaseException] | None:
    """Its leaves if every one is of ``kinds`` (so a one-line message will do), else None."""
    found = list(leaves(error))
    return found if all(isinstance(leaf, kinds) for leaf in found) else None


@contextlib.contextmanager
def listening(what: str, host: str, port: int) -> Iterator[None]:
    """Name the address and its purpose in a failed bind, so the one-line error says which
    option to fix: ``cannot listen on 192.0.2.254:3000 (TCP): Cannot assign requested
    address`` rather than the errno's text alone."""
    try:
        yield
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot listen on {where} ({what}): "
                                 f"{exc.strerror or exc}") from exc
