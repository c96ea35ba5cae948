"""uspan/csrc/handshake.c leaves no key on the stack: tests/c/handshake_stack_test.c runs
the gate's work (keying the MACs, a verdict that checks mac2 against the cookie, a cookie
reply and its subkey) on a thread stack of its own, then searches that stack for any key
it held. Before, the cookie secret's block, the cookie, its keyed state and the subkey's
ChaCha state stayed there."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.unit.test_segment_library import ROOT, compiler


def test_no_key_is_left_on_the_stack(tmp_path: Path) -> None:
    cc = compiler()
    binary = tmp_path / "handshake_stack_test"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O0", "-Wl,-z,now",
                    "-o", str(binary), str(ROOT / "tests/c/handshake_stack_test.c"),
                    "-lcrypto", "-lpthread"], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stdout + done.stderr
