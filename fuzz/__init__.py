"""Coverage-guided fuzz targets (atheris), one per parser that takes outside bytes.

Run one: ``python -m fuzz.device -runs=100000`` (libFuzzer flags; without a corpus
directory the target's seeds are used). ``fuzz/run`` runs them all; the unit test
``tests/unit/test_fuzz.py`` runs each briefly.
"""
