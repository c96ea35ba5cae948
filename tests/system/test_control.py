"""Control work against a real uspan-wg (issue 14), at sizes CI affords: ``wg`` sends a
refused request whole and gets a clear error, a stop signal ends a long set at once, many
simultaneous connects all get in, running out of file descriptors is one log line, and a
SIGINT right at start is clean. (The large sizes are in ``bench/control``.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.system.test_daemon import PROGRAM, gone, start, uapi
from uspan.testbed import UAPI_DIR, Lab, Namespace, genkey, poll

pytestmark = pytest.mark.system


@pytest.fixture
def ns(lab: Lab) -> Namespace:
    return lab.namespace("a")


def prefixes(count: int) -> str:
    return ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(count))


def test_wg_gets_a_clear_refusal_after_writing_a_large_request(lab: Lab, ns: Namespace) -> None:
    # The refusal (the port is taken) must come only after wg wrote all 200,000 allowed
    # IPs, as a reply it can report, not as a closed socket (wg died of SIGPIPE then).
    wg, other = start(lab, ns), start(lab, ns)
    other.set("listen-port", "51999")
    conf = lab.secret_file(f"[Interface]\nListenPort = 51999\n\n[Peer]\n"
                           f"PublicKey = {genkey().public}\nAllowedIPs = {prefixes(200_000)}\n")
    done = subprocess.run(["wg", "addconf", wg.name, str(conf)], capture_output=True, text=True)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Address already in use" in done.stderr
    assert "public_key" not in uapi(wg, "get=1\n\n")  # nothing applied


def test_sigterm_during_a_long_set_exits_at_once(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    request = (f"set=1\npublic_key={os.urandom(32).hex()}\n"
               + "".join(f"allowed_ip=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n"
                         for i in range(300_000)) + "\n")
    sender = threading.Thread(target=lambda: _send_ignoring_errors(wg.socket, request),
                              daemon=True)
    sender.start()
    time.sleep(0.5)  # parsing and applying are under way
    start_time = time.monotonic()
    os.kill(wg.process.pid, signal.SIGTERM)
    poll(lambda: gone(wg.process.pid), what="the daemon to exit", timeout=10, interval=0.005)
    assert time.monotonic() - start_time < 1.0
    assert not wg.socket.exists()
    sender.join(10)


def _send_ignoring_errors(path: object, request: str) -> None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(request.encode())
            sock.recv(100)
    except OSError:
        pass


def test_simultaneous_nonblocking_connects_all_get_in(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    sockets, failed = [], 0
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(wg.socket))
        except OSError:
            failed += 1
        sockets.append(sock)
    for sock in sockets:
        sock.close()
    assert failed == 0
    assert uapi(wg, "get=1\n\n").endswith("errno=0\n\n")


def test_out_of_file_descriptors_is_one_log_line_and_the_daemon_goes_on(
        lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    subprocess.run(["prlimit", f"--pid={wg.process.pid}", "--nofile=48:48"], check=True)
    held = []
    for _ in range(60):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(str(wg.socket))
        except OSError:
            sock.close()
            break
        held.append(sock)
    time.sleep(2.5)  # retried every 0.1 s meanwhile
    for sock in held:
        sock.close()
    assert wg.alive()
    poll(lambda: uapi(wg, "get=1\n\n").endswith("errno=0\n\n"), what="the UAPI to answer",
         timeout=20)
    assert wg.log_path is not None
    log = wg.log_path.read_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "cannot accept" in line]
    assert len(lines) == 1, log


def test_sigint_right_at_start_is_clean(lab: Lab, ns: Namespace) -> None:
    assert PROGRAM
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4):
        code, text = lab.interrupt_at_start(ns, PROGRAM, delay, timeout=20)
        assert not lab.interrupted_before_handler(text), (delay, text)
        assert code is not None, f"SIGINT {delay} s after start was lost: {text}"
        assert "Traceback" not in text, (delay, text)
        assert code in (0, -signal.SIGINT), (delay, code, text)



def test_sigint_in_pythons_start_up_waits_for_the_handler(
        lab: Lab, ns: Namespace, tmp_path: Path) -> None:
    """A SIGINT while the interpreter starts (sent here from sitecustomize, inside
    ``site``, before any uspan code runs) stays blocked by the compiled launcher until
    ``catch()`` has its handler; then the daemon stops as if it came right after start:
    no traceback, exit 0, no socket file or interface left."""
    assert PROGRAM
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    name = lab.interface_name()
    proc = ns.spawn("env", "--default-signal=INT", PROGRAM, "-f", name,
                    stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    _, err = proc.communicate(timeout=30)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and proc.returncode == 0, (proc.returncode, text)
    assert not (UAPI_DIR / f"{name}.sock").exists()
    assert ns.ip("link", "show", name, check=False).returncode != 0
