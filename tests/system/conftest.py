"""Fixtures for system tests: real namespaces, real daemons, the real ``wg`` tool.

System tests are skipped unless the machine can run them (root, /dev/net/tun, ``ip netns``
and the tools). Implementations are ``uspan`` (the ``uspan-wg`` console script next to
``sys.executable``) and ``wgo`` (``/usr/bin/wireguard-go``). A missing or broken
``uspan-wg`` makes its tests fail, never skip; ``pytest -k wgo`` runs the wireguard-go
control alone (the ids of mixed combinations spell it ``wireguardgo`` on purpose).
The variant ``uspan-nooff`` is uspan launched with ``USPAN_OFFLOAD=off`` (ids ``nooff``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from uspan.testbed import Lab, Namespace, Veth
from uspan.testbed.unprivileged import blocker

IMPLS = {
    "uspan": Path(sys.executable).parent / "uspan-wg",
    "wgo": Path("/usr/bin/wireguard-go"),
}
# Variants: an implementation of IMPLS launched with extra environment.
VARIANTS = {"uspan-nooff": ("uspan", {"USPAN_OFFLOAD": "off"})}
TOOLS = ("ip", "wg", "wg-quick", "ping", "ncat", "ss")

# (initiator, responder) and the test id of each combination.
COMBINATIONS = {
    "uspan-uspan": ("uspan", "uspan"),
    "uspan-wireguardgo": ("uspan", "wgo"),
    "wireguardgo-uspan": ("wgo", "uspan"),
    "wgo-wgo": ("wgo", "wgo"),
}
# With uspan's kernel offloads off; only for tests that ask (indirect parametrization).
NO_OFFLOAD_COMBINATIONS = {
    "nooff-nooff": ("uspan-nooff", "uspan-nooff"),
    "nooff-wireguardgo": ("uspan-nooff", "wgo"),
    "wireguardgo-nooff": ("wgo", "uspan-nooff"),
    "nooff-uspan": ("uspan-nooff", "uspan"),
}
FAILED = pytest.StashKey[bool]()  # set on items whose setup or call failed


@functools.cache
def environment_problem() -> str | None:
    """Why system tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "system tests need root"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        return f"/dev/net/tun unusable: {e}"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    probe = f"uspan-probe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=True)
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("system") and (problem := environment_problem()):
        pytest.skip(problem)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


def program(name: str) -> str:
    """The executable of an implementation: uspan must exist (fail), wgo may (skip)."""
    path = IMPLS[name]
    if not os.access(path, os.X_OK):
        if name == "uspan":
            pytest.fail(f"{path} is missing: install the project (pip install -e '.[test]')")
        pytest.skip(f"{path} is not installed")
    return str(path)


@pytest.fixture(params=list(IMPLS))
def impl(request: pytest.FixtureRequest) -> str:
    """Each implementation's executable in turn."""
    return program(request.param)


@dataclass(frozen=True)
class Combination:
    """Which program initiates (namespace a) and which responds (namespace b), and the
    extra environment each is launched with."""

    initiator: str
    responder: str
    initiator_env: Mapping[str, str] = field(default_factory=dict)
    responder_env: Mapping[str, str] = field(default_factory=dict)


def launch(name: str) -> tuple[str, Mapping[str, str]]:
    """The executable and extra environment of an implementation or variant."""
    base, env = VARIANTS.get(name, (name, {}))
    return program(base), env


@pytest.fixture(params=list(COMBINATIONS))
def combo(request: pytest.FixtureRequest) -> Combination:
    """Each combination in turn; ``parametrize("combo", ids, indirect=True)`` picks others,
    e.g. of NO_OFFLOAD_COMBINATIONS."""
    initiator, responder = {**COMBINATIONS, **NO_OFFLOAD_COMBINATIONS}[request.param]
    (a, a_env), (b, b_env) = launch(initiator), launch(responder)
    return Combination(a, b, a_env, b_env)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A lab torn down after the test; daemon logs are printed if the test failed."""
    with Lab() as the_lab:
        yield the_lab
        if request.node.stash.get(FAILED, False):
            print(the_lab.daemon_logs())


@dataclass(frozen=True)
class Pair:
    """Namespaces a and b joined by one veth with IPv4 and IPv6 outer addresses."""

    lab: Lab
    a: Namespace
    b: Namespace
    link: Veth
    a4: str = "192.0.2.1"
    b4: str = "192.0.2.2"
    a6: str = "fd00:2::1"
    b6: str = "fd00:2::2"

    def outer(self, family: int) -> tuple[str, str]:
        """The (a, b) outer addresses of IP version ``family``."""
        return (self.a4, self.b4) if family == 4 else (self.a6, self.b6)


@pytest.fixture
def pair(lab: Lab) -> Pair:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = lab.veth(a, b, ["192.0.2.1/24", "fd00:2::1/64"], ["192.0.2.2/24", "fd00:2::2/64"])
    return Pair(lab, a, b, link)


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A temporary directory other users can reach (pytest's tmp_path is root's, 0700), for
    tests that run programs as nobody; skipped, saying why, when nobody cannot run this
    checkout (see uspan.testbed.unprivileged.blocker)."""
    if problem := blocker():
        pytest.skip(problem)
    directory = Path(tempfile.mkdtemp(prefix="uspan-user-"))
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
