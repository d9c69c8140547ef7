"""Monitoring on the real test bed: the metrics textfile after a deploy, a failed deploy and a
rollback, read by Debian's prometheus-node-exporter for real, and the Grafana annotations
(against a local HTTP receiver) with their token in the Authorization header only."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DemoApp, WebhookReceiver

NODE_EXPORTER = "prometheus-node-exporter"
GRAFANA_TOKEN = "glsa_e2e-grafana-token-7f3a9c2e1b"  # noqa: S105 - a test value
SCRAPE_DEADLINE = 30
STOP_TIMEOUT = 10


def deploy_ok(app: DemoApp) -> None:
    result = app.deploy()
    assert result.returncode == 0, result.stdout + result.stderr


def samples(text: str) -> dict[str, str]:
    """`name{labels}` -> value of every togather_ sample."""
    return dict(re.findall(r"^(togather_\S+) (\S+)$", text, re.MULTILINE))


def expected(app: DemoApp, version: str, **values: int) -> dict[str, str]:
    labels = f'app="{app.name}",environment="{app.env}"'
    out = {f"togather_{name}{{{labels}}}": str(value) for name, value in values.items()}
    out[f'togather_deployed_version_info{{{labels},version="{version}"}}'] = "1"
    return out


def without_times(found: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in found.items() if "_last_timestamp_" not in k
            and "_last_duration_" not in k}


@pytest.fixture
def monitored_app(demo_app: DemoApp, receiver: WebhookReceiver) -> DemoApp:
    """The demo app with its metrics in <remote_dir>/metrics and Grafana at `receiver`."""
    with demo_app.env_file.open("a") as env_file:
        env_file.write(f"DEPLOY_GRAFANA_TOKEN={GRAFANA_TOKEN}\n")
    demo_app.secrets["DEPLOY_GRAFANA_TOKEN"] = GRAFANA_TOKEN
    grafana = receiver.url.removesuffix("/hook")
    demo_app.write_config(monitoring={"textfile_dir": "metrics", "grafana_url": grafana})
    return demo_app


@pytest.fixture
def node_exporter(free_port: Callable[[], int]) -> Iterator[Callable[[str], str]]:
    """`scrape(directory)`: node exporter's /metrics with its textfile collector (only) on
    `directory`; the exporter is stopped afterwards."""
    binary = shutil.which(NODE_EXPORTER)
    if binary is None:
        pytest.fail(f"{NODE_EXPORTER} is not installed: run scripts/testbed-up.sh")
    started: list[subprocess.Popen] = []

    def scrape(directory: str) -> str:
        port = free_port()
        started.append(subprocess.Popen(
            [binary, "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={directory}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + SCRAPE_DEADLINE
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",  # noqa: S310
                                            timeout=5) as resp:
                    return resp.read().decode()
            except OSError:
                if time.monotonic() > deadline or started[-1].poll() is not None:
                    raise
                time.sleep(0.2)

    yield scrape
    for process in started:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def test_deploy_failure_and_rollback_are_exported_and_read_by_node_exporter(
        monitored_app: DemoApp, receiver: WebhookReceiver,
        node_exporter: Callable[[str], str]) -> None:
    app = monitored_app
    textfile = Path(app.remote_dir) / "metrics" / f"togather_{app.name}_{app.env}.prom"
    first = app.head[:7]
    before = time.time()
    deploy_ok(app)

    assert stat.S_IMODE(os.stat(textfile).st_mode) == 0o644
    found = samples(textfile.read_text())
    assert without_times(found) == expected(
        app, first, deploy_last_success=1, rollbacks_total=0, deploy_failures_total=0,
        lock_held=0)
    labels = f'{{app="{app.name}",environment="{app.env}"}}'
    assert before <= float(found[f"togather_deploy_last_timestamp_seconds{labels}"]) \
        <= time.time()
    assert 0 < float(found[f"togather_deploy_last_duration_seconds{labels}"]) < 600

    second = app.commit("second", {"app/VERSION_NOTE": "2\n"})[:7]
    deploy_ok(app)
    app.set_health_mode("crash")
    assert app.deploy().returncode == 4
    assert without_times(samples(textfile.read_text())) == expected(
        app, second, deploy_last_success=0, rollbacks_total=0, deploy_failures_total=1,
        lock_held=0)

    assert app.inv("rollback", app.env_flag).returncode == 0
    after_rollback = expected(app, first, deploy_last_success=1, rollbacks_total=1,
                              deploy_failures_total=1, lock_held=0)
    assert without_times(samples(textfile.read_text())) == after_rollback

    scraped = node_exporter(str(textfile.parent))
    assert without_times(samples(scraped)) == after_rollback
    assert "node_textfile_scrape_error 0" in scraped

    paths = {path for path, _ in receiver.requests}
    assert paths == {"/api/annotations"}
    assert {h["Authorization"] for _, h in receiver.requests} == {f"Bearer {GRAFANA_TOKEN}"}
    assert [e["tags"][-1] for e in receiver.events] == [
        "event:completed", "event:completed", "event:failed", "event:rolled_back"]
    assert receiver.events[-1]["text"].startswith(
        f"{app.name} {app.env}: rollback {first} by ")
    assert "failed at health" in receiver.events[2]["text"]
    app.assert_no_secrets(*(r.decode() for r in receiver.raw))
