"""Exceptions out of trio nurseries: the programs report the ones they expect in one line."""

from __future__ import annotations

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
