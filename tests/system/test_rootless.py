"""Running without root: ``nobody`` with only CAP_NET_ADMIN, with no capability on a TUN
made for it, a whole lab in its own user namespace, and one clear line for each missing
privilege. Every program here runs as ``nobody`` through setpriv (uspan.testbed.unprivileged);
root only builds the test's namespaces, as an administrator or container runtime would.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jsonstream import read_json_stream
from tests.system.conftest import Pair, program
from uspan.lab import userns
from uspan.testbed import Namespace, PeerConfig, genkey, genpsk, poll
from uspan.testbed.unprivileged import as_user, ids, private_dir_for

pytestmark = pytest.mark.system

BIN = Path(sys.executable).parent
USPAN, USPAN_WG = str(BIN / "uspan"), str(BIN / "uspan-wg")
PORT_A, PORT_B = 51071, 51072
INNER = ("10.71.0.1", "10.71.0.2")


@pytest.fixture
def home(user_tmp: Path) -> Path:
    """A directory of nobody's own."""
    return private_dir_for(user_tmp / "nobody")


def run_as(ns: Namespace | None, argv: list[str], caps: list[str] | None = None,
           env: dict[str, str] | None = None, timeout: float = 30,
           ) -> subprocess.CompletedProcess[str]:
    command = as_user(argv, caps or [], env=env)
    if ns is not None:
        command = ["ip", "netns", "exec", ns.name, *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The program failed with exactly one line on stderr and no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() and "\n" not in done.stderr.strip(), done.stderr
    return done.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def start_uspan_wg(pair: Pair, name: str, home: Path, uapi: Path, caps: list[str]) -> int:
    """uspan-wg -f NAME in namespace a as nobody with ``caps``; its PID once serving."""
    log = home / f"{name}.log"
    with log.open("wb") as out:
        daemon = pair.a.spawn(*as_user([USPAN_WG, "-f", "--uapi-dir", str(uapi), name], caps,
                                       env={"LOG_LEVEL": "verbose"}),
                              stdout=out.fileno(), stderr=subprocess.STDOUT)
    socket = uapi / f"{name}.sock"

    def serving() -> bool:
        assert daemon.poll() is None, log.read_text()
        return socket.exists()

    poll(serving, what=f"uspan-wg to create {socket}", timeout=30)
    return daemon.pid


def tunnel_to_wireguard_go(pair: Pair, name: str, uapi: Path, home: Path) -> None:
    """Configure nobody's uspan-wg (with `uspan wg`, as nobody) and a wireguard-go peer in
    b, address both ends, and ping across both ways."""
    wgo = pair.lab.start_wireguard(pair.b, program("wgo"))
    keys, psk = genkey(), genpsk()
    conf = home / f"{name}.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {keys.private}\nListenPort = {PORT_A}\n\n"
                    f"[Peer]\nPublicKey = {wgo.keys.public}\nPresharedKey = {psk}\n"
                    f"AllowedIPs = {INNER[1]}/32\nEndpoint = {pair.b4}:{PORT_B}\n")
    os.chown(conf, *ids())
    os.chmod(conf, 0o600)
    env = {"USPAN_UAPI_DIR": str(uapi)}
    done = run_as(pair.a, [USPAN, "wg", "setconf", name, str(conf)], env=env)
    assert done.returncode == 0, done.stderr
    conf.unlink()
    wgo.configure(listen_port=PORT_B, peers=[PeerConfig(keys.public, [f"{INNER[0]}/32"],
                                                        None, psk)])
    wgo.add_address(f"{INNER[1]}/24")
    wgo.up()
    for side, target in ((pair.a, INNER[1]), (pair.b, INNER[0])):
        ping = side.run("ping", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
        assert ping.returncode == 0, ping.stdout + pair.lab.daemon_logs()
    shown = run_as(pair.a, [USPAN, "wg", "show", name, "latest-handshakes"], env=env)
    assert wgo.keys.public in shown.stdout and "\t0\n" not in shown.stdout, shown


def capabilities(pid: int) -> tuple[int, int]:
    """(effective UID, effective capability mask) of a running process."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[1]), int(fields["CapEff"].strip(), 16)


def test_uspan_wg_as_nobody_with_only_net_admin_interoperates(pair: Pair, home: Path) -> None:
    name, uapi = pair.lab.interface_name(), home / "run" / "wireguard"
    pid = start_uspan_wg(pair, name, home, uapi, ["net_admin"])
    assert capabilities(pid) == (ids()[0], 1 << 12)  # CAP_NET_ADMIN alone
    socket = uapi / f"{name}.sock"
    assert (mode(socket), socket.stat().st_uid) == (0o600, ids()[0])
    assert mode(uapi) == mode(uapi.parent) == 0o700
    # nobody with CAP_NET_ADMIN sets the addresses itself
    for args in (["addr", "add", f"{INNER[0]}/24", "dev", name], ["link", "set", name, "up"]):
        done = run_as(pair.a, ["ip", *args], caps=["net_admin"])
        assert done.returncode == 0, done.stderr
    tunnel_to_wireguard_go(pair, name, uapi, home)


def test_uspan_wg_without_capabilities_on_a_tun_made_for_it(pair: Pair, home: Path) -> None:
    name, uapi = pair.lab.interface_name(), home / "wireguard"
    # the administrator's half: the TUN for nobody, its address, MTU and link state
    pair.a.ip("tuntap", "add", "mode", "tun", "user", str(ids()[0]), "name", name)
    pair.a.ip("link", "set", name, "mtu", "1420")
    pair.a.ip("addr", "add", f"{INNER[0]}/24", "dev", name)
    pair.a.ip("link", "set", name, "up")
    pid = start_uspan_wg(pair, name, home, uapi, [])
    assert capabilities(pid) == (ids()[0], 0)
    tunnel_to_wireguard_go(pair, name, uapi, home)
    # still no capability: a TUN of another name is refused, with what would grant it,
    # and so is a firewall mark (wg gets wireguard-go's errno; the log says why)
    other = run_as(pair.a, [USPAN_WG, "-f", f"{name}x"], env={"USPAN_UAPI_DIR": str(uapi)})
    assert "CAP_NET_ADMIN" in one_line_error(other)
    mark = run_as(pair.a, [USPAN, "wg", "set", name, "fwmark", "0x20"],
                  env={"USPAN_UAPI_DIR": str(uapi)})
    assert mark.returncode != 0
    assert "a firewall mark needs CAP_NET_ADMIN" in (home / f"{name}.log").read_text()


def test_lab_as_nobody_in_its_own_user_namespace(home: Path) -> None:
    root, name = home / "labs", f"rl{secrets.token_hex(3)}"
    lab = [USPAN, "lab"]
    holder = None
    try:
        up = run_as(None, [*lab, "up", "--name", name, "--root", str(root), "--timeout", "90"],
                    timeout=150)
        holder = userns.holder_pid(root)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "rootless" in up.stdout and "6/6" in up.stdout
        assert holder is not None
        ping = run_as(None, [*lab, "ping", "--root", str(root), "-c", "1", "-o", "json"])
        assert ping.returncode == 0, ping.stdout + ping.stderr
        pairs = json.loads(ping.stdout)
        assert len(pairs) == 6, pairs
        shown = run_as(None, [*lab, "exec", "--root", str(root), "n1", "--", "wg", "show"])
        assert shown.returncode == 0 and "peer:" in shown.stdout, shown
        # nothing of root's: the namespaces are not on the host, every file is nobody's
        assert not [n for n in os.listdir("/run/netns") if name in n]
        for path in [root, *root.rglob("*")]:
            assert path.lstat().st_uid == ids()[0], path
        state = root / name / "nodes" / "n1" / "state"
        assert mode(state) == 0o700
        assert mode(state / "kubespan-identity.yaml") == 0o600
        assert mode(state / "node.sock") == 0o600
        user_ns = os.readlink(f"/proc/{holder}/ns/user")
        down = run_as(None, [*lab, "down", "--root", str(root)])
        assert down.returncode == 0, down.stderr
        assert [p.name for p in root.iterdir()] == ["userns.lock"]
        assert userns.holder_pid(root) is None
        # the holder and everything in its namespaces are gone (init reaps them)
        poll(lambda: not _in_user_namespace(user_ns), what="the namespace to empty",
             timeout=20)
        assert not Path(f"/proc/{holder}").exists()
    finally:
        if holder is not None and Path(f"/proc/{holder}").exists():
            run_as(None, [*lab, "down", "--all", "--root", str(root)])
            if Path(f"/proc/{holder}").exists():
                os.kill(holder, 9)


def _in_user_namespace(link: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "user") == link:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# one line for each missing privilege ---------------------------------------------------


def test_missing_net_admin_is_one_line(pair: Pair, home: Path) -> None:
    name = pair.lab.interface_name()
    done = run_as(pair.a, [USPAN_WG, "-f", name], env={"USPAN_UAPI_DIR": str(home / "w")})
    message = one_line_error(done)
    assert "CAP_NET_ADMIN" in message and "--cap-add NET_ADMIN" in message
    assert "ip tuntap add mode tun user" in message and "uspan-wg alone" in message


def test_missing_tun_device_is_one_line(pair: Pair, home: Path) -> None:
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /dev/net && exec "$@"', "sh"]
    command = as_user([USPAN_WG, "-f", pair.lab.interface_name()], ["net_admin"],
                      env={"USPAN_UAPI_DIR": str(home / "w")})
    done = pair.a.run(*hide, *command, check=False)
    assert "--device /dev/net/tun" in one_line_error(done)


def test_unwritable_uapi_directory_is_one_line(pair: Pair, home: Path) -> None:
    done = run_as(pair.a, [USPAN_WG, "-f", pair.lab.interface_name()], ["net_admin"],
                  env={"USPAN_UAPI_DIR": "/var/lib/uspan-not-yours/wireguard"})
    message = one_line_error(done)
    assert "USPAN_UAPI_DIR" in message and "--uapi-dir" in message


def test_uspan_run_without_net_admin_is_one_line(pair: Pair, home: Path) -> None:
    config = home / "node.yaml"
    made = run_as(None, [USPAN, "gen", "config", "--with-kubespan", "--discovery-endpoint",
                         f"{pair.b4}:3000", "-o", str(config)])
    assert made.returncode == 0, made.stderr
    assert (mode(config), config.stat().st_uid) == (0o600, ids()[0])
    run = [USPAN, "run", "--config", str(config), "--hostname", "n"]
    done = run_as(pair.a, [*run, "--state-dir", str(home / "state")])
    assert "CAP_NET_ADMIN" in one_line_error(done)
    assert mode(home / "state") == 0o700
    done = run_as(pair.a, [*run, "--state-dir", "/var/lib/uspan-not-yours"], ["net_admin"])
    assert "--state-dir" in one_line_error(done)


def test_lab_commands_of_nobody_are_one_line(home: Path) -> None:
    up = run_as(None, [USPAN, "lab", "up", "--root", "/var/lib/uspan-not-yours/labs"])
    assert "--root" in one_line_error(up)
    for command in (["down"], ["exec", "n1", "--", "true"], ["status"]):
        done = run_as(None, [USPAN, "lab", *command, "--root", str(home / "labs")])
        assert "no lab in" in one_line_error(done)
    assert not (home / "labs").exists()  # asking created nothing


def test_node_as_nobody_in_its_own_user_namespace(home: Path) -> None:
    """The README's rootless node: `uspan run` as nobody with no capability, in a user,
    network and mount namespace of its own (with a discovery service beside it there)."""
    config, state = home / "node.yaml", home / "state"
    made = run_as(None, [USPAN, "gen", "config", "--with-kubespan", "--discovery-endpoint",
                         "127.0.0.1:3000", "-o", str(config)])
    assert made.returncode == 0, made.stderr
    script = ('mount -t tmpfs none /run && ip link set lo up && '
              f'({USPAN} discovery-service --listen 127.0.0.1:3000 >/dev/null 2>&1 &) && '
              f'exec {USPAN} run --config {config} --state-dir {state}')
    log = home / "node.log"
    with log.open("wb") as out:
        node = subprocess.Popen(as_user(["unshare", "--user", "--map-root-user", "--net",
                                         "--mount", "sh", "-c", script]),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def identity() -> str | None:
            assert node.poll() is None, log.read_text()
            done = subprocess.run([USPAN, "get", "kubespanidentities", "-o", "json",
                                   "--state-dir", str(state)], capture_output=True, text=True,
                                  check=False)
            return done.stdout if done.returncode == 0 else None

        assert "fd" in read_json_stream(poll(identity, what="the node", timeout=30))[0]["spec"][
            "address"]
        assert capabilities(node.pid)[0] == ids()[0]  # nobody on the host
        for path in [state, *state.iterdir()]:
            assert path.lstat().st_uid == ids()[0], path
        assert mode(state / "kubespan-identity.yaml") == mode(state / "node.sock") == 0o600
    finally:
        os.killpg(node.pid, 15)  # the node and the discovery service beside it
        node.wait(10)
