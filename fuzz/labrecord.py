"""The lab's record (``lab.json``), as every ``uspan lab`` command reads it.

Properties: ``record.load`` returns a record or raises ``LabError`` (one line for the
user), never a traceback, whatever the file holds (a crash mid-write cannot leave a torn
file: writes are atomic; this is about a file edited or damaged by hand).
"""

from __future__ import annotations

import dataclasses
import json

import atheris

with atheris.instrument_imports(include=["uspan"]):
    from uspan.lab.record import RECORD, LabError, LabRecord, NodeRecord, Proc, load

from fuzz.harness import check, main, scratch

ROOT = scratch("lab")
(ROOT / "fuzz").mkdir(exist_ok=True)


def test_one(data: bytes) -> None:
    (ROOT / "fuzz" / RECORD).write_bytes(data)
    try:
        record = load(ROOT, "fuzz")
    except LabError as exc:
        check("\n" not in str(exc), "a multi-line error")
        return
    check(isinstance(record, LabRecord), "load returned something else")


if __name__ == "__main__":
    node = NodeRecord("n1", 1, "uspan", "easy", "ks-fuzz-1", "uspan-fuzz-n1",
                      proc=Proc(123, "456", ["uspan", "run"]))
    record = LabRecord("fuzz", str(ROOT), 1, 1420, namespaces=["uspan-fuzz-sw"], nodes=[node],
                       discovery=Proc(1, None, []), cuts=[["n1", "n2", None]])
    main(test_one, [json.dumps(dataclasses.asdict(record)).encode()])
