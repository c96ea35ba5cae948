"""uspan/csrc/segment.c as a C library, built without Python (as the data-plane thread
will build it) by tests/c/segment_test.c: split, merge and the send side's cut over its
own buffers, the flow-hash seed its caller chooses, the error codes. Under AddressSanitizer
and UBSan."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compiler() -> str:
    """The C compiler, or the test skips (fails where USPAN_REQUIRE_COMPILED=1)."""
    name = (sysconfig.get_config_var("CC") or "cc").split()[0]
    cc = shutil.which(name) or shutil.which("cc")
    if cc is None:
        if os.environ.get("USPAN_REQUIRE_COMPILED") == "1":
            pytest.fail("no C compiler, and USPAN_REQUIRE_COMPILED=1")
        pytest.skip("no C compiler")
    return cc


def test_the_library_builds_and_runs_without_python(tmp_path: Path) -> None:
    cc = compiler()
    binary = tmp_path / "segment_test"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-o", str(binary), str(ROOT / "tests/c/segment_test.c")], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stdout + done.stderr
