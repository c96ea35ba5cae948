"""The node's commands: ``uspan gen config``, ``run``, ``get``, ``apply-config``, ``leave``."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from pathlib import Path

import trio

from uspan import atomicfile, capabilities, privilege, userpaths
from uspan import signals as stop_signals
from uspan.daemon.clock import MonotonicClock
from uspan.errors import expected
from uspan.mesh.config import ConfigError, parse_config, render_config
from uspan.mesh.resources import (
    OUTPUTS,
    Event,
    ResourceError,
    format_events,
    format_resources,
    resolve_type,
)
from uspan.node.api import SOCKET_NAME, ApiClient, ApiError


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = commands.add_parser("gen", help="generate files: `uspan gen config`",
                              description="Generate files for a node.")
    what = gen.add_subparsers(dest="what", required=True, metavar="WHAT")
    config = what.add_parser(
        "config", help="a commented node config with a fresh cluster ID and secret",
        description="Write a commented YAML node config. The cluster ID and secret are 32 "
        "random bytes each unless given; every node of a cluster shares them.")
    config.add_argument("--with-kubespan", action="store_true",
                        help="enable KubeSpan (needs --discovery-endpoint)")
    config.add_argument("--cluster-id", metavar="ID", help="base64 (standard or URL-safe)")
    config.add_argument("--cluster-secret", metavar="S", help="base64, 32 bytes")
    config.add_argument("--discovery-endpoint", action="append", default=[],
                        metavar="HOST:PORT", help="a discovery service (repeat for more)")
    config.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="write here (mode 0600) instead of standard output")
    config.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    config.set_defaults(handler=gen_config_command)

    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                       help=f"the node's state directory ({userpaths.state_dir()})")

    run = commands.add_parser(
        "run", parents=[state], help="run a mesh node in the foreground",
        description="Run a KubeSpan-style mesh node: identity, discovery, WireGuard device, "
        "peers and status, until SIGINT or SIGTERM. SIGHUP re-reads the config.")
    run.add_argument("--config", type=Path, required=True, metavar="FILE")
    run.add_argument("--hostname", default=socket.gethostname(), metavar="NAME",
                     help="the name others see (%(default)s)")
    run.add_argument("--uapi-socket", metavar="PATH",
                     help=f"UAPI socket for wg ({userpaths.uapi_dir()}/IFACE.sock); "
                     "'none' for none")
    run.add_argument("--leave-on-exit", action="store_true",
                     help="delete this node from discovery on SIGINT/SIGTERM")
    run.add_argument("--metrics", type=_host_port, metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=run_command, service=True)

    get = commands.add_parser(
        "get", parents=[state], help="show the resources of a running node",
        description="Show a running node's resources: kubespanidentities, kubespanpeerspecs, "
        "kubespanpeerstatuses, kubespanendpoints, members, affiliates, discoverystatus.")
    get.add_argument("resource", metavar="RESOURCE")
    get.add_argument("id", nargs="?", metavar="ID")
    get.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    get.add_argument("-w", "--watch", action="store_true", help="stream changes as they happen")
    get.add_argument("--show-secrets", action="store_true",
                     help="show the private key instead of redacting it")
    get.set_defaults(handler=get_command)

    apply = commands.add_parser(
        "apply-config", parents=[state], help="change a running node's config in place",
        description="Validate FILE and apply it to the running node without a restart: "
        "KubeSpan on/off, registries, MTU, port, filters. Tunnels that stay are kept.")
    apply.add_argument("file", type=Path, metavar="FILE")
    apply.set_defaults(handler=apply_command)

    leave = commands.add_parser(
        "leave", parents=[state], help="delete the node from discovery and stop it",
        description="Delete the running node's affiliate from discovery, then stop it.")
    leave.set_defaults(handler=leave_command)


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir if args.state_dir is not None else userpaths.state_dir()


def _fail(command: str, message: object) -> int:
    print(f"uspan {command}: {message}", file=sys.stderr)
    return 1


# gen config ------------------------------------------------------------------------------


def gen_config_command(args: argparse.Namespace) -> int:
    try:
        text = render_config(with_kubespan=args.with_kubespan, cluster_id=args.cluster_id,
                             cluster_secret=args.cluster_secret,
                             discovery_endpoints=args.discovery_endpoint)
    except ConfigError as exc:
        return _fail("gen config", exc)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        return _fail("gen config", f"{args.output} exists (use --force to overwrite)")
    try:
        atomicfile.write(args.output, text.encode())  # 0600: it holds the secret
    except OSError as exc:
        return _fail("gen config", f"{args.output}: {exc.strerror or exc}")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# run ----------------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    stop_signals.catch()  # before anything exists: see uspan.signals
    capabilities.raise_permitted()  # a container's CAP_NET_ADMIN (uspan.capabilities)
    from uspan.node.node import Node, NodeError, NodeOptions, load_config

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except NodeError as exc:
        return _fail("run", exc)
    uapi = args.uapi_socket
    options = NodeOptions(
        config_path=args.config, state_dir=_state_dir(args), hostname=args.hostname,
        uapi_path=None if uapi == "none" else (uapi or "default"),
        leave_on_exit=args.leave_on_exit, metrics=args.metrics)

    async def main() -> int:
        return await Node(config, options).run()

    try:
        return trio.run(main, clock=MonotonicClock())  # its Daemon's data plane's clock
    except (NodeError, ApiError, OSError, BaseExceptionGroup) as error:
        found = expected(error, NodeError, ApiError, OSError)
        if found is None:
            raise
        message = str(found[0])
        denied = "Operation not permitted" in message or isinstance(found[0], PermissionError)
        if denied and "CAP_NET_ADMIN" not in message:
            message = privilege.with_hint(message, privilege.net_admin_hint(
                errno.EPERM, "the TUN device, its addresses, routes and firewall mark"))
        return _fail("run", message)


# get / apply-config / leave ------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(str(_state_dir(args) / SOCKET_NAME))


def get_command(args: argparse.Namespace) -> int:
    try:
        rtype = resolve_type(args.resource)
    except ResourceError as exc:
        return _fail("get", str(exc).strip("'\""))
    client = _client(args)
    first = True

    async def show(node: str, events: list[Event]) -> None:
        nonlocal first
        if events:
            sys.stdout.write(format_events(rtype, node, events, args.output, first=first,
                                           show_secrets=args.show_secrets))
            sys.stdout.flush()
            first = False

    async def main() -> None:
        if args.watch:
            await client.get(rtype, args.id, secrets=args.show_secrets, on_events=show)
        else:
            node, found = await client.get(rtype, args.id, secrets=args.show_secrets)
            sys.stdout.write(format_resources(rtype, node, found, args.output,
                                              show_secrets=args.show_secrets))

    try:
        trio.run(main)
    except ApiError as exc:
        return _fail("get", exc)
    except KeyboardInterrupt:
        return 130
    return 0


def apply_command(args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text()
        parse_config(text)  # name the field here, before bothering the node
    except OSError as exc:
        return _fail("apply-config", f"{args.file}: {exc.strerror or exc}")
    except ConfigError as exc:
        return _fail("apply-config", f"{args.file}: {exc}")
    try:
        reply = trio.run(_client(args).request, {"op": "apply", "config": text})
    except ApiError as exc:
        return _fail("apply-config", exc)
    print(reply.get("ok", ""))
    return 0


def leave_command(args: argparse.Namespace) -> int:
    try:
        reply = trio.run(_client(args).request, {"op": "leave"})
    except ApiError as exc:
        return _fail("leave", exc)
    print(reply.get("ok", ""))
    return 0
