"""The plane's core (uspan/csrc/plane*.c) is C with no Python in it: it builds and links
as a shared library with no Python headers on the include path and no undefined symbol
left (`-Wl,--no-undefined`: a call into libpython fails the link), and exports nothing
(hidden visibility, as segment.c and handshake.c: two extensions never bind to each
other's copy). The binding (uspan/plane/_plane.c) is the only file with Python.h."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.unit.test_segment_library import ROOT, compiler

CORE = sorted((ROOT / "uspan/csrc").glob("plane*.c"))


def test_the_core_is_split_into_its_files() -> None:
    names = {path.name for path in CORE}
    assert names == {"plane.c", "plane_tables.c", "plane_keypair.c", "plane_news.c",
                     "plane_steps.c", "plane_gate.c", "plane_thread.c"}
    for path in [*CORE, ROOT / "uspan/csrc/plane.h"]:
        assert not re.search(r'#\s*include\s*[<"]Python\.h', path.read_text()), path


def test_the_core_links_without_python(tmp_path: Path) -> None:
    cc = compiler()
    library = tmp_path / "libplane.so"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-shared", "-fPIC",
                    "-Wl,--no-undefined", "-o", str(library), *map(str, CORE),
                    str(ROOT / "uspan/csrc/segment.c"), str(ROOT / "uspan/csrc/handshake.c"),
                    "-lcrypto", "-lpthread"], check=True)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], check=True,
                              capture_output=True, text=True).stdout.split()
    assert not [name for name in exported if name.startswith(("pl_", "seg_", "hs_"))]
    local = subprocess.run(["nm", str(library)], check=True, capture_output=True,
                           text=True).stdout.split()
    assert {"pl_tun_step", "pl_udp_step", "pl_run"} <= set(local)  # built, only hidden
