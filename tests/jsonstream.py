"""Reading ``uspan get -o json`` back in tests: a stream of objects, as talosctl prints
(what ``jq`` reads), not one JSON document."""

from __future__ import annotations

import json
from typing import Any


def read_json_stream(text: str) -> list[dict[str, Any]]:
    """The objects of ``uspan get -o json`` output (a stream, as talosctl's: what ``jq``
    reads); a ValueError names where it is malformed."""
    decoder = json.JSONDecoder()
    objects: list[dict[str, Any]] = []
    end = 0
    while (start := len(text) - len(text[end:].lstrip())) < len(text):
        item, end = decoder.raw_decode(text, start)
        if not isinstance(item, dict):
            raise ValueError(f"not a JSON object at character {start}")
        objects.append(item)
    return objects
