"""The ``Lab``: owner of a testbed's namespaces, links, daemons and files."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from uspan.testbed.namespace import Namespace, Veth
from uspan.testbed.process import NetnsError, OwnedProcess, poll, run, start_time, tail
from uspan.testbed.wireguard import UAPI_DIR, WgKeys, WireGuard, genkey, socket_owner


class Lab:
    """Owner of a set of namespaces, links and daemons; ``close()`` removes them all."""

    def __init__(self, prefix: str = "usp") -> None:
        self.prefix = f"{prefix}{secrets.token_hex(3)}"
        self.namespaces: list[Namespace] = []
        self.interfaces: list[WireGuard] = []
        self._processes: list[OwnedProcess] = []
        self._names: list[str] = []
        self._files: list[Path] = []
        self._dir = Path(tempfile.mkdtemp(prefix="uspan-lab-"))  # mode 0700

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=kind is None)

    def namespace(self, role: str) -> Namespace:
        """Create a namespace named ``PREFIX-ROLE`` with loopback up."""
        ns = Namespace(self, f"{self.prefix}-{role}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def veth(
        self, a: Namespace, b: Namespace, a_addrs: Sequence[str] = (), b_addrs: Sequence[str] = ()
    ) -> Veth:
        """Join ``a`` and ``b`` with a veth pair carrying the given addresses, both up."""
        link = Veth(a, f"v{secrets.token_hex(4)}", b, f"v{secrets.token_hex(4)}")
        a.ip("link", "add", link.a_dev, "type", "veth", "peer", "name", link.b_dev,
             "netns", b.name)  # fmt: skip
        for cidr in a_addrs:
            a.add_address(link.a_dev, cidr)
        for cidr in b_addrs:
            b.add_address(link.b_dev, cidr)
        a.link_up(link.a_dev, wait=False)
        b.link_up(link.b_dev)
        a.wait_up(link.a_dev)
        return link

    def bridge(self, nodes: Sequence[Namespace], addrs: Sequence[Sequence[str]]) -> list[Veth]:
        """A bridge namespace joining every node by a veth; node i gets ``addrs[i]``."""
        if len(addrs) != len(nodes):
            raise NetnsError(f"bridge: {len(nodes)} nodes but {len(addrs)} address lists")
        hub = self.namespace("br")
        hub.ip("link", "add", "br0", "type", "bridge")
        hub.link_up("br0")
        links = []
        for node, node_addrs in zip(nodes, addrs, strict=True):
            link = self.veth(hub, node, (), node_addrs)
            hub.ip("link", "set", link.a_dev, "master", "br0")
            links.append(link)
        return links

    def secret_file(self, text: str) -> Path:
        """Write ``text`` to a new mode-0600 file in the lab's private directory."""
        fd, path = tempfile.mkstemp(dir=self._dir, prefix="secret-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(path)

    def remove_on_close(self, path: Path) -> None:
        """Delete ``path`` (if it exists) when the lab closes."""
        self._files.append(path)

    def interface_name(self) -> str:
        """A fresh interface name, reserved: its link and UAPI socket are removed on close."""
        while True:
            name = f"wg{secrets.token_hex(4)}"
            if not (UAPI_DIR / f"{name}.sock").exists() and name not in self._names:
                self._names.append(name)
                return name

    def start_wireguard(
        self,
        ns: Namespace,
        program: str,
        *,
        foreground: bool = False,
        log_level: str = "error",
        keys: WgKeys | None = None,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> WireGuard:
        """Launch ``program [-f] IFACE`` in ``ns`` and wait for its UAPI socket (uspan-wg, a
        Python program, takes about a second to start on a loaded 2-core machine).

        Without ``foreground`` the launcher must exit 0 after daemonizing, as with
        wireguard-go; the daemon is then found as the owner of the UAPI socket. ``env``
        adds to (or overrides) the inherited environment and ``LOG_LEVEL``.
        """
        if not os.access(program, os.X_OK):
            raise NetnsError(f"{program}: not an executable file")
        name = self.interface_name()
        log = self._dir / f"{name}.log"
        argv = [program, "-f", name] if foreground else [program, name]
        environment = {**os.environ, "LOG_LEVEL": log_level, **(env or {})}
        with log.open("wb") as out:
            launcher = ns.spawn(
                *argv, stdout=out.fileno(), stderr=subprocess.STDOUT, env=environment
            )
        owned = self._processes[-1]  # the launcher; in the foreground also the daemon
        socket_path = UAPI_DIR / f"{name}.sock"

        def started() -> bool:
            if socket_path.exists():
                return True
            if launcher.poll() is not None:
                raise NetnsError(
                    f"{program} {name}: exited {launcher.returncode} before creating "
                    f"{socket_path}; log:\n{tail(log)}"
                )
            return False

        try:
            poll(started, what=f"{program} to create {socket_path}", timeout=timeout)
            if not foreground:
                try:
                    code = launcher.wait(timeout)
                except subprocess.TimeoutExpired as e:
                    raise NetnsError(f"{program} {name}: launcher did not daemonize") from e
                if code != 0:
                    raise NetnsError(f"{program} {name}: launcher exited {code}:\n{tail(log)}")
            pid = poll(
                lambda: socket_owner(ns, socket_path),
                what=f"the process serving {socket_path}",
                timeout=timeout,
            )
        except TimeoutError as e:
            raise NetnsError(f"{program} {name}: {e}; log:\n{tail(log)}") from e
        process = owned
        if not foreground:
            process = OwnedProcess(pid, start_time(pid))
            self._processes.append(process)
        wg = WireGuard(self, name, program, ns, keys or genkey(), process, log)
        self.interfaces.append(wg)
        return wg

    def interrupt_at_start(self, ns: Namespace, program: str, delay: float,
                           timeout: float = 15.0) -> tuple[int | None, str]:
        """Launch ``program -f IFACE`` in ``ns`` and send it SIGINT ``delay`` seconds after
        it was executed:
        (its exit status, or None if it did not exit within ``timeout``; its stderr)."""
        name = self.interface_name()
        # SIGINT at its default: a runner in a background job (bash ignores SIGINT there)
        # would hand the program an ignored SIGINT until it installs its own handler.
        proc = ns.spawn("env", "--default-signal=INT", program, "-f", name,
                        stderr=subprocess.PIPE, env={**os.environ, "LOG_LEVEL": "error"})
        _wait_exec(proc.pid, program)  # the program's start, not `ip netns exec`'s
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return None, (err or b"").decode(errors="replace")
        return proc.returncode, (err or b"").decode(errors="replace")

    @staticmethod
    def interrupted_before_handler(stderr: str) -> bool:
        """Whether a KeyboardInterrupt came before the program's own handler existed: in
        Python's start-up or the entry point's first imports (where no program can help).
        Inside ``site``'s processing of a ``.pth`` file (an editable install's finder),
        ``site`` prints the interrupt and carries on, so the program then runs as if it
        had never been sent."""
        if "init_import_site" in stderr or (
                "KeyboardInterrupt" in stderr and "Error processing line" in stderr):
            return True
        frames = [line for line in stderr.splitlines() if line.strip().startswith("File ")]
        ours = [line for line in frames if "uspan" in line and "<frozen" not in line]
        return "KeyboardInterrupt" in stderr and all(
            "bin/uspan-wg" in line or "launch.py" in line or "<string>" in line
            for line in ours)

    def adopt_wireguard(
        self, ns: Namespace, name: str, program: str, keys: WgKeys, timeout: float = 20.0
    ) -> WireGuard:
        """Take ownership of a daemon someone else launched in ``ns`` (e.g. wg-quick)."""
        socket_path = UAPI_DIR / f"{name}.sock"
        pid = poll(
            lambda: socket_owner(ns, socket_path),
            what=f"the process serving {socket_path}",
            timeout=timeout,
        )
        process = OwnedProcess(pid, start_time(pid))
        self._processes.append(process)
        wg = WireGuard(self, name, program, ns, keys, process, None)
        self.interfaces.append(wg)
        return wg

    def daemon_logs(self) -> str:
        """The tail of every daemon's log, for reports of failed tests."""
        return "\n".join(
            f"--- {wg.name} ({wg.program}) ---\n{wg.log_tail()}" for wg in self.interfaces
        )

    def close(self, raise_errors: bool = True) -> None:
        """Stop our processes, delete namespaces, sockets and files, even after failures."""
        errors: list[str] = []
        for process in reversed(self._processes):
            try:
                process.stop()
            except (OSError, subprocess.SubprocessError, NetnsError) as e:
                errors.append(f"stopping pid {process.pid}: {e}")
        for ns in self.namespaces:  # anything left inside our own namespaces is ours
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in self._names:
            (UAPI_DIR / f"{name}.sock").unlink(missing_ok=True)
        for ns in reversed(self.namespaces):
            done = run(["ip", "netns", "del", ns.name], check=False)
            if done.returncode != 0:
                errors.append(f"ip netns del {ns.name}: {done.stderr.strip()}")
        for path in self._files:
            path.unlink(missing_ok=True)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._processes.clear()
        self.namespaces.clear()
        self._names.clear()
        self._files.clear()
        if errors:
            message = "lab cleanup: " + "; ".join(errors)
            if raise_errors:
                raise NetnsError(message)
            print(message, file=sys.stderr)


def _wait_exec(pid: int, program: str, timeout: float = 10.0) -> None:
    """Wait until ``pid`` runs ``program`` (the wrappers before it, ``ip netns exec`` and
    ``env``, have replaced themselves with it), or has ended; a signal before that would
    test a wrapper, not the program."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return  # gone (or a zombie): nothing left to wait for
        # The program, or what it became: the launcher of uspan-wg execs uspan-wg-python.
        name = os.fsencode(program)
        if any(arg.endswith((name, name + b"-python")) for arg in argv[:2]):
            return
        time.sleep(0.001)
