"""The container contract, without an image or an engine: ``Containerfile``'s ENTRYPOINT,
USER and ENV, run as a container runtime would with ``--cap-drop ALL --cap-add NET_ADMIN
--device /dev/net/tun --read-only -v STATE:/var/lib/uspan``: in a network namespace of
its own, as that user holding only CAP_NET_ADMIN (setpriv), in a mount namespace where
everything is read-only but the state directory. Two such "containers" and a discovery
service on a bridge must form a mesh and carry pings.

The image's paths are mapped to the test's: /opt/uspan/bin/uspan to this venv's, /etc/uspan
and /var/lib/uspan to directories of the test. Both ways a runtime may grant the capability
are run: in the ambient set (podman, setpriv), or only in the bounding set (Docker,
containerd, CRI-O for a non-root user), where the image's file capability on its
interpreter (``cap_net_admin+p``, here on a copy of this one) supplies it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.jsonstream import read_json_stream
from uspan.testbed import Lab, Namespace, poll
from uspan.testbed.unprivileged import as_user

pytestmark = pytest.mark.system

CONTAINERFILE = Path(__file__).resolve().parents[2] / "Containerfile"
BIN = Path(sys.executable).parent
SERVICE = "192.0.2.254"
# In a private mount namespace: the state directory stays writable, every other mount
# (but /proc, /sys, /dev) is remounted read-only; then the program ($2...).
READ_ONLY_VIEW = ('mount --bind "$1" "$1" && grep -o "^[^ ]* [^ ]* [^ ]* [^ ]* [^ ]*" '
                  '/proc/self/mountinfo | cut -d" " -f5 | while read -r m; do case "$m" in '
                  '/proc*|/sys*|/dev*|"$1") ;; *) mount -o remount,bind,ro "$m" 2>/dev/null;; '
                  'esac; done; shift; exec "$@"')


def contract() -> tuple[list[str], str, dict[str, str]]:
    """ENTRYPOINT, USER and ENV of the Containerfile."""
    entrypoint: list[str] = []
    user, env = "root", {}
    for line in CONTAINERFILE.read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "USER":
            user = rest.strip()
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return entrypoint, user, env


def file_capability_python(base: Path) -> list[str]:
    """A copy of this interpreter with the image's file capability (cap_net_admin+p), and
    the arguments that make it run ``uspan`` from this venv."""
    python = base / "python3"
    shutil.copy2(os.path.realpath(sys.executable), python)
    subprocess.run(["setcap", "cap_net_admin+p", str(python)], check=True)
    site_dir = sysconfig.get_paths()["purelib"]
    boot = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
            "from uspan.cli import main; sys.exit(main())")
    return [str(python), "-I", "-S", "-c", boot, site_dir]  # no system site-packages


class Container:
    """One running "container": its network namespace, config and state directories.

    ``uspan``: the program to run as the entrypoint's; ``ambient``: whether the runtime
    puts NET_ADMIN in the ambient set (podman, setpriv) or only in the bounding set
    (Docker, containerd, CRI-O: the image's file capability must then provide it).
    """

    def __init__(self, ns: Namespace, base: Path, config: str, uspan: list[str],
                 ambient: bool) -> None:
        self.ns = ns
        self.uspan, self.ambient = uspan, ambient
        self.etc, self.state = base / "etc", base / "state"
        entrypoint, user, env = contract()
        self.uid, self.gid = (int(part) for part in user.split(":"))
        for directory in (self.etc, self.state):
            directory.mkdir(mode=0o700)
            os.chown(directory, self.uid, self.gid)
        (self.etc / "config.yaml").write_text(config)
        os.chmod(self.etc / "config.yaml", 0o400)
        os.chown(self.etc / "config.yaml", self.uid, self.gid)
        self.argv = [*uspan, *(self.map(a) for a in entrypoint[1:])]
        assert entrypoint[0] == "/opt/uspan/bin/uspan"
        self.env = {k: self.map(v) for k, v in env.items()}
        self.log = base / "node.log"
        with self.log.open("wb") as out:
            self.process = ns.spawn(*self.wrap(self.argv), stdout=out.fileno(),
                                    stderr=subprocess.STDOUT)

    def map(self, text: str) -> str:
        return text.replace("/etc/uspan", str(self.etc)).replace("/var/lib/uspan",
                                                                   str(self.state))

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` as the container runs it (see the module docstring)."""
        user = f"{self.uid}:{self.gid}"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_VIEW,
                "sh", str(self.state), *as_user(argv, ["net_admin"], user=user, env=self.env,
                                                ambient=self.ambient)]

    def get(self, resource: str) -> list[dict[str, object]]:
        done = subprocess.run([str(BIN / "uspan"), "get", resource, "-o", "json",
                               "--state-dir", str(self.state)], capture_output=True, text=True,
                              check=False, timeout=10)
        return read_json_stream(done.stdout) if done.returncode == 0 else []


@pytest.mark.parametrize("ambient", [True, False], ids=["ambient", "file-capability"])
def test_containerfile_entrypoint_meshes_with_only_net_admin(lab: Lab, user_tmp: Path,
                                                             ambient: bool) -> None:
    base = user_tmp
    uspan = [str(BIN / "uspan")] if ambient else file_capability_python(base)
    c1, c2, sw = lab.namespace("c1"), lab.namespace("c2"), lab.namespace("sw")
    lab.bridge([c1, c2, sw], [["192.0.2.1/24"], ["192.0.2.2/24"], [f"{SERVICE}/24"]])
    sw.spawn(*as_user([str(BIN / "uspan"), "discovery-service", "--listen", f"{SERVICE}:3000"]))
    sw.wait_listening(3000)
    config = subprocess.run([str(BIN / "uspan"), "gen", "config", "--with-kubespan",
                             "--discovery-endpoint", f"{SERVICE}:3000"], capture_output=True,
                            text=True, check=True).stdout
    containers = []
    for index, ns in enumerate((c1, c2)):
        (base / f"c{index}").mkdir()
        containers.append(Container(ns, base / f"c{index}", config, uspan, ambient))

    def meshed() -> bool:
        for container in containers:
            assert container.process.poll() is None, container.log.read_text()
        return all([s.get("spec", {}).get("state") == "up" for s in c.get("kubespanpeerstatuses")]
                   == [True] for c in containers)

    poll(meshed, what="both containers to see each other up", timeout=40)
    peer = containers[1].get("kubespanidentities")[0]["spec"]
    address = str(peer["address"]).split("/")[0]  # type: ignore[index]
    ping = c1.run("ping", "-c", "3", "-i", "0.2", "-W", "2", address, check=False)
    assert ping.returncode == 0, ping.stdout
    for container in containers:
        status = dict(line.split(":", 1) for line in Path(
            f"/proc/{container.process.pid}/status").read_text().splitlines())
        assert status["Uid"].split()[1] == str(container.uid)
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 1 << 12
        for path in [container.state, *container.state.rglob("*")]:
            info = path.lstat()
            assert info.st_uid == container.uid, path
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "other"
            assert stat.S_IMODE(info.st_mode) == (0o700 if kind == "dir" else 0o600), path
    # the same view, the same user: only the state directory can be written
    first = containers[0]
    probe = first.wrap(["sh", "-c", f'touch "{first.state}/probe" && ! touch /tmp/uspan-'
                        f'probe-{os.getpid()} 2>/dev/null && ! touch "{first.etc}/x" 2>/dev/null'])
    assert c1.run(*probe, check=False).returncode == 0
    assert not Path(f"/tmp/uspan-probe-{os.getpid()}").exists()


def test_no_new_privileges_loses_the_file_capability(user_tmp: Path) -> None:
    """What the README warns of: under no_new_privs (``--security-opt no-new-privileges``,
    ``allowPrivilegeEscalation: false``) the kernel ignores the image's file capability, so
    with NET_ADMIN only in the bounding set (Docker, containerd) the node cannot have it:
    one line naming CAP_NET_ADMIN, no traceback (without no_new_privs the same meshes:
    the file-capability case above)."""
    entrypoint, user, env = contract()
    python = file_capability_python(user_tmp)
    state = user_tmp / "state"
    state.mkdir(mode=0o700)
    uid, gid = (int(part) for part in user.split(":"))
    os.chown(state, uid, gid)
    config = user_tmp / "config.yaml"
    generated = subprocess.run([str(BIN / "uspan"), "gen", "config", "--with-kubespan",
                                "--discovery-endpoint", f"{SERVICE}:3000"],
                               capture_output=True, text=True, check=True)
    config.write_text(generated.stdout)
    os.chmod(config, 0o444)
    args = [a.replace("/etc/uspan/config.yaml", str(config)).replace("/var/lib/uspan", str(state))
            for a in entrypoint[1:]]
    env = {k: v.replace("/var/lib/uspan", str(state)) for k, v in env.items()}
    argv = as_user([*python, *args], ["net_admin"], user=user, env=env, ambient=False,
                   no_new_privs=True)
    done = subprocess.run(["unshare", "--net", *argv], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "CAP_NET_ADMIN" in done.stderr, done.stderr
