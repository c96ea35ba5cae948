"""``uspan-wg [-f|--foreground] [--no-offload] [--uapi-dir DIR] IFACE``: wireguard-go's
launch contract.

The UAPI socket is ``/var/run/wireguard/IFACE.sock`` for root; other users (a process
with only CAP_NET_ADMIN, or none on a TUN made for it) get a directory of their own
(``uspan.userpaths``); ``--uapi-dir`` or ``USPAN_UAPI_DIR`` choose another.

``--no-offload`` (or ``USPAN_OFFLOAD=off``, for launchers like wg-quick that pass no
flags) keeps the TUN and UDP kernel offloads off; ``--features`` creates a throwaway TUN
and reports which offloads this kernel accepts. ``USPAN_PLANE=0`` keeps the trio data
path where the C data plane (``uspan.plane``) was built; ``--version`` says which one a
daemon started now would use.

Without ``-f`` (and without ``WG_PROCESS_FOREGROUND=1``) the process forks; the child
detaches (setsid), creates the TUN, the UAPI socket and the UDP sockets, and tells the
parent through a pipe whether that worked. The parent exits 0 once the interface is
ready, or 1 with the child's error. ``LOG_LEVEL=verbose|error|silent`` sets logging; a
detached child keeps stdout/stderr only when LOG_LEVEL is set and not silent.
"""

from __future__ import annotations

import os
import sys

import trio

from uspan import __version__, capabilities
from uspan import signals as stop_signals
from uspan.daemon import dataplane
from uspan.daemon.clock import MonotonicClock
from uspan.daemon.daemon import Daemon, log, setup_logging
from uspan.daemon.tun import Tun, validate_name
from uspan.daemon.uapi_server import socket_path
from uspan.daemon.udp import UdpBind

USAGE = ("Usage: uspan-wg [-f/--foreground] [--no-offload] [--uapi-dir DIR] INTERFACE-NAME\n"
         "       uspan-wg --features | --version")
EXIT_USAGE = 2
_READY = b"ready"


def main(argv: list[str] | None = None) -> int:
    stop_signals.catch()  # before anything exists: see uspan.signals
    capabilities.raise_permitted()  # a container's CAP_NET_ADMIN (uspan.capabilities)
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        print(f"uspan-wg v{__version__}\n\nUserspace WireGuard daemon in Python (trio).")
        print(f"Data plane: {_plane_state()}")
        return 0
    if args == ["--features"]:
        return _print_features()
    args, uapi_dir = _take_option(args, "--uapi-dir")
    flags = {arg for arg in args if arg.startswith("-")}
    names = [arg for arg in args if not arg.startswith("-")]
    if uapi_dir == "" or len(names) != 1 or not flags <= {"-f", "--foreground", "--no-offload"}:
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    try:
        interface = validate_name(names[0])
    except ValueError as exc:
        print(f"uspan-wg: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    foreground = bool(flags & {"-f", "--foreground"})
    foreground = foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    offload = "--no-offload" not in flags and os.environ.get("USPAN_OFFLOAD", "on") != "off"
    level = os.environ.get("LOG_LEVEL")
    uapi_path = socket_path(interface, uapi_dir)
    if foreground:
        return _run_foreground(interface, uapi_path, level, offload)
    return _run_detached(interface, uapi_path, level, offload)


def _plane_state() -> str:
    if dataplane.wanted():
        return "C thread (uspan/plane/_plane.c); USPAN_PLANE=0 for the trio path"
    if dataplane.COMPILED:
        return f"trio ({dataplane.ENV}=0)"
    return "trio (uspan/plane/_plane.c was not built)"


def _take_option(args: list[str], name: str) -> tuple[list[str], str | None]:
    """``args`` without ``NAME VALUE`` (or ``NAME=VALUE``), and VALUE ("" if missing)."""
    rest: list[str] = []
    value: str | None = None
    items = iter(args)
    for arg in items:
        if arg == name:
            value = next(items, "")
        elif arg.startswith(name + "="):
            value = arg.partition("=")[2]
        else:
            rest.append(arg)
    return rest, value


def _print_features() -> int:
    """Create a throwaway TUN and UDP sockets and say which offloads the kernel took."""
    name = f"uspfeat{os.getpid() % 100000}"
    try:
        tun = Tun.open(name)
    except OSError as exc:
        print(f"uspan-wg: cannot create a TUN to probe: {exc}", file=sys.stderr)
        return 1
    try:
        udp = UdpBind.open(0)
    except OSError as exc:
        tun.close()
        print(f"uspan-wg: cannot open UDP sockets to probe: {exc}", file=sys.stderr)
        return 1
    features = tun.features
    print("tun_vnet_hdr:", "off" if features is None else "on")
    for name_ in ("csum", "tso4", "tso6", "uso4", "uso6"):
        print(f"tun_{name_}:", "on" if features and name_ in features else "off")
    for key, value in udp.features().items():
        print(f"{key}:", "on" if value else "off")
    udp.close()
    tun.close()
    return 0


def _run_foreground(interface: str, uapi_path: str, level: str | None, offload: bool) -> int:
    setup_logging(interface, level)
    log.debug("Starting uspan-wg version %s", __version__)
    try:
        daemon = Daemon.open(interface, uapi_path=uapi_path, offload=offload)
    except OSError as exc:
        print(f"uspan-wg: {interface}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return _serve(daemon)


def _serve(daemon: Daemon) -> int:
    try:
        return trio.run(_run_until_signal, daemon, clock=MonotonicClock())
    except Exception:  # a bug in a task: say so, then exit non-zero
        log.exception("Device failed")
        return 1


async def _run_until_signal(daemon: Daemon) -> int:
    """The device, and the program's stop signals beside it (see uspan.signals)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, daemon)
        code = await daemon.run()
        nursery.cancel_scope.cancel()
    return code


async def _stop_on_signal(daemon: Daemon) -> None:
    signum = await stop_signals.first()
    daemon.stop(f"received {signum.name}")


def _run_detached(interface: str, uapi_path: str, level: str | None, offload: bool) -> int:
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() != 0:
        os.close(write_end)
        return _wait_ready(read_end, interface)
    os.close(read_end)
    os.setsid()
    try:
        daemon = Daemon.open(interface, uapi_path=uapi_path, offload=offload)
    except OSError as exc:
        os.write(write_end, str(exc.strerror or exc).encode())
        os._exit(1)
    _detach_stdio(keep_output=level is not None and level != "silent")
    setup_logging(interface, level)
    log.debug("Starting uspan-wg version %s", __version__)
    os.write(write_end, _READY)
    os.close(write_end)
    os._exit(_serve(daemon))


def _wait_ready(read_end: int, interface: str) -> int:
    """Parent: the child's word through the pipe (EOF without it means it died)."""
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    message = b"".join(chunks)
    if message == _READY:
        return 0
    text = message.decode(errors="replace") or "the daemon exited during startup"
    print(f"uspan-wg: {interface}: {text}", file=sys.stderr)
    return 1


def _detach_stdio(keep_output: bool) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if not keep_output:
        os.dup2(null, 1)
        os.dup2(null, 2)
    os.close(null)
