"""Hypothesis without deadlines: CI shares its cores with system tests, and a slow example
there says nothing about correctness (speed is measured in bench/, not in tests)."""

from hypothesis import settings

settings.register_profile("uspan", deadline=None)
settings.load_profile("uspan")
