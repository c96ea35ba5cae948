"""The ``uspan`` command's own output: ``uspan stats`` in one column of names and one of
values, whatever the names' lengths; ``--help`` in plain text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from uspan.cli import counter_lines


def test_values_line_up_after_the_longest_name() -> None:
    lines = counter_lines(["drop_replay=0", "plane_egress_punts_dropped=12", "x=3"])
    assert [line.split() for line in lines] == [
        ["drop_replay", "0"], ["plane_egress_punts_dropped", "12"], ["x", "3"]]
    assert len({line.rindex(" ") for line in lines}) == 1, lines


def test_no_counters_no_lines() -> None:
    assert counter_lines([]) == []


def test_top_level_help_is_plain_text() -> None:
    """``uspan --help`` showed the module docstring's reST (``The ``uspan`` command line.``)."""
    done = subprocess.run([str(Path(sys.executable).parent / "uspan"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("usage: uspan"), done
    assert "``" not in done.stdout, done.stdout
