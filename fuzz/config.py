"""Node config files and the node's identity files, as the node reads them from disk.

The first byte picks the file: 0, the config (``node.load_config``); 1, the node identity;
2, the KubeSpan identity (``identity.load_or_create`` on a state directory holding it).
The rest is the file's bytes, written to a real file.

Properties: only the documented errors (``NodeError`` for a config, ``IdentityError`` for
an identity), each with a one-line message; a refused identity file is left untouched
(nothing is "repaired" over an operator's broken key).
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["uspan"]):
    from uspan.mesh import identity
    from uspan.mesh.config import render_config
    from uspan.node.node import NodeError, load_config

from fuzz.harness import check, main, scratch

WORK = scratch("config")
FILES = [WORK / "config.yaml", WORK / identity.NODE_IDENTITY_FILE,
         WORK / identity.KUBESPAN_IDENTITY_FILE]


def test_one(data: bytes) -> None:
    if not data:
        return
    which, body = data[0] % 3, data[1:]
    for path in FILES:
        path.unlink(missing_ok=True)
    FILES[which].write_bytes(body)
    if which == 0:
        try:
            load_config(FILES[0])
        except NodeError as exc:
            check("\n" not in str(exc), "a multi-line error")
        return
    try:
        identity.load_or_create(WORK)
    except identity.IdentityError as exc:
        check("\n" not in str(exc), "a multi-line error")
        check(FILES[which].read_bytes() == body, "a refused identity file was rewritten")


if __name__ == "__main__":
    main(test_one, [
        b"\x00" + render_config(with_kubespan=True,
                                discovery_endpoints=["192.0.2.254:3000"]).encode(),
        b"\x01nodeId: " + b"7" * identity.NODE_ID_LENGTH + b"\n",
        b"\x02privateKey: " + b"YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=\n",
    ])
