"""Hypothesis without deadlines: CI shares its cores with system tests, and a slow example
there says nothing about correctness (speed is measured in bench/, not in tests).

System tests run first: they are the long ones (10-60 s, mostly waiting on protocol
timers), and as scripts/test hands tests to xdist's workers one at a time, the short unit
tests after them fill the workers' ends evenly; a long test started last would leave the
other workers idle until it ends."""

import pytest
from hypothesis import settings

settings.register_profile("uspan", deadline=None)
settings.load_profile("uspan")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("system") is None)  # stable
