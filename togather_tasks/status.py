"""What `status` and `health` report per host, assembled here so the tasks stay thin: where
each host's proxy routes, what runs in each slot, and each host's health through its proxy."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from . import maintenance, proxy, slots
from .config import Settings
from .health import Verdict
from .hosts import Host


def host_status(settings: Settings, host: Host) -> dict[str, Any]:
    """`{"routes_to": slot|None, "slots": {slot: {"image", "container"}}, "maintenance":
    {"on", "message", "retry_after", "since", "by"}}` for one host."""
    images = slots.read_slot_images(settings, host)
    notice = maintenance.read(settings, host)
    return {"routes_to": proxy.routed_slot(settings, host),
            "slots": {slot: {"image": images.get(slot), "container": slots.slot_container_state(
                settings, host, slot).split(" ")[0]} for slot in ("blue", "green")},
            "maintenance": {"on": notice is not None, **(notice or {})}}


def describe_hosts(per_host: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, info in per_host.items():
        lines.append(f"host {name}: proxy -> {info['routes_to'] or '-'}")
        notice = info.get("maintenance") or {}
        if notice.get("on"):
            lines.append(f"  maintenance {maintenance.describe(notice)}")
        lines += [f"  {slot:<5} {slot_info['container']:<10} {slot_info['image'] or '-'}"
                  for slot, slot_info in info["slots"].items()]
    return lines


@dataclass(frozen=True)
class HostHealth:
    where: str
    verdict: Verdict
    latency_ms: int

    def as_dict(self, require_healthy: bool) -> dict[str, Any]:
        return {"url": self.where, "status": self.verdict.status,
                "http_status": self.verdict.http_status,
                "ok": self.verdict.acceptable(require_healthy=require_healthy),
                "problem": self.verdict.problem, "version": self.verdict.version,
                "latency_ms": self.latency_ms}

    def line(self, name: str) -> str:
        http = f"HTTP {self.verdict.http_status}, " if self.verdict.http_status else ""
        version = f", version {self.verdict.version}" if self.verdict.version else ""
        problem = f": {self.verdict.problem}" if self.verdict.problem else ""
        return f"host {name}: {self.verdict.status} ({http}{self.latency_ms} ms){version}{problem}"


def host_health(settings: Settings, host: Host, slot: str,
                expected_version: str | None) -> HostHealth:
    """One host's health: through its proxy (`active`) or one slot's port."""
    port = settings.ports["proxy"] if slot == "active" else settings.ports[slot]
    address = proxy.address(settings) if slot == "active" else "127.0.0.1"
    start = time.monotonic()
    verdict = slots.check_health(settings, host, port, expected_version=expected_version,
                                 timeout=float(settings.health.timeout), address=address)
    return HostHealth(f"{host.name}:{address}:{port}{settings.health_endpoint}", verdict,
                      int((time.monotonic() - start) * 1000))
