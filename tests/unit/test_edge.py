"""The slots' private network with the proxy (togather_tasks/edge.py): pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from togather_tasks import edge


def test_the_derived_subnet_is_the_blue_ports_29_in_the_pool() -> None:
    assert str(edge.derived_subnet(8081)) == "10.200.252.136/29"
    assert str(edge.derived_subnet(1)) == "10.200.0.8/29"
    assert str(edge.derived_subnet(65535)) == "10.207.255.248/29"


def test_two_ports_never_share_a_subnet_and_all_stay_in_the_pool() -> None:
    subnets = {edge.derived_subnet(port) for port in range(1, 65536)}
    assert len(subnets) == 65535
    assert all(net.subnet_of(edge.DERIVED_POOL) for net in subnets)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_a_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(ValueError):
        edge.derived_subnet(port)


def test_slot_addresses_follow_the_gateway() -> None:
    net = ipaddress.IPv4Network("172.30.9.0/24")
    assert (edge.slot_address(net, "blue"), edge.slot_address(net, "green")) == (
        "172.30.9.2", "172.30.9.3")
    assert edge.subnet("172.30.9.0/24", 8081) == net
    assert edge.subnet(None, 8081) == edge.derived_subnet(8081)


@pytest.mark.parametrize("value, problem", [
    ("10.201.0.8/29", None),
    ("192.168.77.0/24", None),
    (42, "must be an IPv4 network"),
    ("10.201.0.9/29", "not an IPv4 network"),
    ("10.201.0.8/30", "too small"),
    ("8.8.8.0/29", "not a private network"),
    ("127.0.0.0/29", "not a private network"),
    ("nonsense", "not an IPv4 network"),
])
def test_proxy_subnet_problems(value: object, problem: str | None) -> None:
    found = edge.subnet_problem(value)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_slots_not_on_the_edge_network_are_legacy() -> None:
    out = ("app-blue e2e-1-staging_default\n"
           "app-green e2e-1-staging_default,e2e-1-staging_edge\n"
           "proxy \n"
           "acme \n")
    assert edge.parse_slot_networks(out, "e2e-1-staging") == {"blue"}
    assert edge.parse_slot_networks("", "p") == set()
    # Another project's edge network does not count.
    assert edge.parse_slot_networks("app-green x_edge\n", "p") == {"green"}


def test_route_conflicts_are_the_routes_the_bridge_would_shadow() -> None:
    routes = """\
default via 10.77.0.1 dev eth0
10.0.0.0/8 via 192.168.1.1 dev tun0
10.201.27.200/29 dev br-9672ebb9341a proto kernel scope link src 10.201.27.201
172.31.101.0/24 dev docker0 proto kernel scope link src 172.31.101.1 linkdown
blackhole 10.201.0.0/16
10.201.27.203 dev wg0 scope link
10.201.28.0/24 dev eth1 proto kernel scope link src 10.201.28.5
"""
    network = ipaddress.IPv4Network("10.201.27.200/29")
    assert edge.route_conflicts(network, routes) == [
        "10.0.0.0/8 via 192.168.1.1 dev tun0", "blackhole 10.201.0.0/16",
        "10.201.27.203 dev wg0 scope link"]
    assert edge.route_conflicts(ipaddress.IPv4Network("172.30.9.0/29"), routes) == []
    assert edge.route_conflicts(network, "") == []
