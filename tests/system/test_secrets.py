"""No secret leaves a node or the discovery service except where asked for.

Three nodes and a service run at the most verbose log level (``debug``), with metrics on;
the mesh forms, carries pings, has its config applied live and re-read (SIGHUP), loses a
node that then rejoins, and loses the service (with its state file) that then restarts.
Then every log line, every ``uspan get`` output (each resource type, json and yaml), the
metrics pages of every node and of the service, and the service's
stored state are searched for each node's private key and the cluster secret (also every
peer's preshared key) in every encoding we know of: raw bytes, hex (both cases), base64,
urlsafe base64, each with and without padding. A hit fails the test.
"""

from __future__ import annotations

import base64
import signal
import sys
from pathlib import Path

import pytest
import yaml

from tests.system.meshnet import SERVICE, Mesh
from uspan.mesh.resources import RESOURCE_TYPES
from uspan.testbed import Lab

pytestmark = pytest.mark.system

FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())")


def encodings(secret: bytes) -> dict[str, bytes]:
    """``secret`` as it could appear in text or bytes."""
    forms = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": base64.b64encode(secret),
        "urlsafe base64": base64.urlsafe_b64encode(secret),
    }
    for name in ("base64", "urlsafe base64"):
        forms[f"{name} unpadded"] = forms[name].rstrip(b"=")
    return forms


def find(secrets: dict[str, bytes], where: str, data: bytes) -> list[str]:
    return [f"{label} ({form}) in {where}"
            for label, secret in secrets.items()
            for form, encoded in encodings(secret).items() if encoded in data]


@pytest.mark.timeout(300)
def test_no_secret_in_logs_get_output_metrics_or_discovery_state(
        lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    mesh = Mesh(lab, tmp_path, 3)
    mesh.stop_service()
    state = tmp_path / "state" / "discovery.state"
    service_args = ["--state-file", str(state), "--log-level", "debug",
                    "--metrics", f"{SERVICE}:9101"]
    mesh.start_service(*service_args)
    for node in mesh.nodes:
        node.extra = ["--metrics", f"{node.address4}:9100"]  # --log-level debug: meshnet's
        node.start()
    mesh.wait_full_mesh()
    n1, n2, n3 = mesh.nodes
    n1.ns.run("ping", "-c", "3", "-i", "0.2", n2.kubespan_ip())
    # Config applied live, then re-read on SIGHUP: both paths log what changed.
    mesh.write_config(n1, mtu=1400)
    n1.cli("apply-config", str(n1.config_path))
    mesh.write_config(n2, mtu=1380)
    assert n2.process is not None
    n2.process.send_signal(signal.SIGHUP)
    n3.stop("KILL")
    n3.start()
    mesh.stop_service()
    mesh.start_service(*service_args)
    mesh.wait_full_mesh()

    config = yaml.safe_load(n1.config_path.read_text())
    secrets = {"cluster secret (every peer's preshared key)":
               base64.b64decode(config["cluster"]["secret"])}
    for node in mesh.nodes:
        key = yaml.safe_load((node.state_dir / "kubespan-identity.yaml").read_text())
        secrets[f"{node.name}'s private key"] = base64.b64decode(key["privateKey"])

    outputs: dict[str, bytes] = {}
    for node in mesh.nodes:
        for rtype in RESOURCE_TYPES:  # every format on n1 (they render the same data)
            for fmt in ("json", "yaml", "table") if node is n1 else ("json",):
                done = node.cli("get", rtype.plural, "-o", fmt)
                outputs[f"{node.name}: uspan get {rtype.plural} -o {fmt}"] = done.stdout.encode()
        outputs[f"{node.name} metrics"] = node.ns.run(
            sys.executable, "-c", FETCH, f"http://{node.address4}:9100/metrics").stdout.encode()
        outputs[f"{node.name} log"] = node.log_path.read_bytes()
    outputs["service metrics"] = mesh.service_ns.run(
        sys.executable, "-c", FETCH, f"http://{SERVICE}:9101/metrics").stdout.encode()
    outputs["service log"] = mesh.service_log.read_bytes()
    for path in state.parent.iterdir():
        outputs[f"service state {path.name}"] = path.read_bytes()

    # The search must be able to hit: the secrets are where they belong.
    assert find(secrets, "n1 config", n1.config_path.read_bytes())
    shown = n1.cli("get", "kubespanidentities", "-o", "yaml", "--show-secrets")
    assert find(secrets, "get --show-secrets", shown.stdout.encode())  # asked for: shown
    debug_lines = sum(o.count(b" DEBUG ") for name, o in outputs.items() if "log" in name)
    assert debug_lines > 0, "the logs are not at debug level"
    hits = [hit for where, data in outputs.items() for hit in find(secrets, where, data)]
    assert not hits, "secrets leaked:\n" + "\n".join(hits)
    print(f"searched {len(outputs)} outputs, {sum(map(len, outputs.values()))} bytes, "
          f"{debug_lines} debug lines: no secret")


def test_search_finds_every_encoding() -> None:
    """The search itself: each encoding of a key, embedded in text, is a hit."""
    secret = bytes(range(200, 232))
    for form, encoded in encodings(secret).items():
        assert find({"k": secret}, "x", b"noise " + encoded + b" noise") != [], form

