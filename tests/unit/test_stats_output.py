"""``uspan stats``: one column of names, one of values, whatever the names' lengths."""

from __future__ import annotations

from uspan.cli import counter_lines


def test_values_line_up_after_the_longest_name() -> None:
    lines = counter_lines(["drop_replay=0", "plane_egress_punts_dropped=12", "x=3"])
    assert [line.split() for line in lines] == [
        ["drop_replay", "0"], ["plane_egress_punts_dropped", "12"], ["x", "3"]]
    assert len({line.rindex(" ") for line in lines}) == 1, lines


def test_no_counters_no_lines() -> None:
    assert counter_lines([]) == []
