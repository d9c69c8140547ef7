"""The private network between the proxy and the slots (pure; no SSH here).

nginx runs in the host's network namespace. Through a slot's published port on 127.0.0.1 each
request crossed Docker's userland port forwarder (docker-proxy), a second copy of every byte in
another process: on the 2-core test bed it spent as much CPU per request as nginx itself
(40-57 ms per 1,000 requests). So each slot also joins a small bridge network of its
environment, `<project>_edge`, at a fixed address, and nginx's upstream groups name those
addresses: the host routes to the bridge directly, no forwarder in between. Fixed, because an
upstream address lives in site.conf and changing it would take a reload (a reload closes idle
client connections): a recreated slot comes back at the same address.

The subnet is a /29 (the gateway, blue, green), by default derived from the environment's blue
port inside 10.200.0.0/13, so two environments on one host (their ports differ) never get the
same one; `proxy.subnet` chooses another where that range is in use. The slots' published
ports stay: the tool's health gate and `curl 127.0.0.1:<port>` on the host use them.

Docker refuses a subnet that overlaps one of its own networks, but not one that overlaps a
route the host already has (a VPN's, a routed office network): the bridge would quietly take
over those addresses on the host. So before the network is created, the host's routes are
read (`route_conflicts`) and an overlap stops the deploy.

A slot container from before this network (a host deployed by an older version) is not on it
until it is recreated; until then its upstream stays its published port (`slot_networks` below
tells which), so the upgrade never sends a request to an address nothing answers on.
"""

from __future__ import annotations

import ipaddress

DERIVED_POOL = ipaddress.IPv4Network("10.200.0.0/13")
PREFIX = 29  # network, gateway, blue, green, three spare, broadcast
SLOT_OFFSETS = {"blue": 2, "green": 3}  # .1 is the bridge's gateway (Docker's default)
NETWORK = "edge"  # compose.yml's network name; Compose prefixes the project


def derived_subnet(blue_port: int) -> ipaddress.IPv4Network:
    """The default /29: the blue port's index in 10.200.0.0/13 (2^19 addresses, 65,536 /29s:
    one per port number, so the environments of one host never collide)."""
    if not 1 <= blue_port <= 65535:
        raise ValueError(f"not a port: {blue_port}")
    base = int(DERIVED_POOL.network_address) + blue_port * (1 << (32 - PREFIX))
    return ipaddress.IPv4Network((base, PREFIX))


def subnet(configured: str | None, blue_port: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(configured) if configured else derived_subnet(blue_port)


def slot_address(network: ipaddress.IPv4Network, slot: str) -> str:
    return str(network.network_address + SLOT_OFFSETS[slot])


def subnet_problem(value: object) -> str | None:
    """Why `proxy.subnet` cannot be the edge network, or None."""
    if not isinstance(value, str):
        return "must be an IPv4 network such as 10.201.0.8/29"
    try:
        network = ipaddress.IPv4Network(value)
    except ValueError as exc:
        return f"{value!r} is not an IPv4 network ({exc})"
    if network.prefixlen > PREFIX:
        return f"{value}: too small, a /{PREFIX} or larger holds the gateway and both slots"
    if not network.is_private or network.is_loopback or network.is_link_local:
        return f"{value}: not a private network (RFC 1918 or similar)"
    return None


def network_name(project: str) -> str:
    return f"{project}_{NETWORK}"


def parse_slot_networks(output: str, project: str) -> set[str]:
    """The slots whose container exists but is not on the edge network, from lines
    `<service> <network>,<network>...` (`docker ps --all --format`): their upstream stays the
    published port. A slot with no container is not among them: whatever creates it next
    uses this compose.yml, which puts it on the network."""
    legacy = set()
    edge = network_name(project)
    for line in output.splitlines():
        service, _, networks = line.strip().partition(" ")
        slot = service.removeprefix("app-")
        if slot in SLOT_OFFSETS and service.startswith("app-") and \
                edge not in networks.split(","):
            legacy.add(slot)
    return legacy


# `ip route` types that come before the destination; Docker's own devices (its overlaps it
# reports itself, "Pool overlaps").
_ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "throw", "unreachable",
                "prohibit", "blackhole", "nat", "anycast"}
_DOCKER_DEVICES = ("br-", "docker")
EDGE_EXISTS = "togather-edge-exists"


def route_conflicts(network: ipaddress.IPv4Network, routes: str) -> list[str]:
    """The lines of `ip -4 route show` whose destination overlaps `network`, but the default
    route and routes on Docker's own bridges: the addresses the edge bridge would take away
    from a network the host reaches another way."""
    found = []
    for line in routes.splitlines():
        fields = line.split()
        if fields and fields[0] in _ROUTE_TYPES:
            fields = fields[1:]
        if not fields or fields[0] == "default":
            continue
        device = fields[fields.index("dev") + 1] if "dev" in fields[:-1] else ""
        if device.startswith(_DOCKER_DEVICES):
            continue
        try:
            destination = ipaddress.IPv4Network(fields[0], strict=False)
        except ValueError:
            continue
        if destination.prefixlen and destination.overlaps(network):
            found.append(" ".join(line.split()))
    return found
