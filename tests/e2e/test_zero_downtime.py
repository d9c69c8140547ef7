"""Zero downtime as a test (SPEC section 5): keep-alive load through the proxy during a real
deploy and a real rollback, and not one request may fail.

A short version of bench/zero_downtime.py (which also measures the timings): it counts, it does
not time. "Failed" means no 2xx even after one retry on a fresh connection, which is what
standard clients do when a closed keep-alive connection meets a request (TESTBED.md). The
switch renames a marker nginx reads per request and never reloads (issue 10), so no connection
is closed under the load and nothing needs that retry either.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loadgen import LoadResult, run_during  # noqa: E402

pytestmark = pytest.mark.e2e

MIN_REQUESTS = 2000
LOAD_MAX_SECONDS = 240


def labels_seen(load: LoadResult) -> set[str]:
    return {label for _, labels in load.slots_seen for label in labels}


def explain(load: LoadResult) -> str:
    return (f"sent {load.sent}, ok {load.ok}, failed {load.failed} (conn {load.conn_errors}, "
            f"non-2xx {load.non_2xx}), retried {load.retried}; failures {load.failure_reasons}; "
            f"retries {load.retry_reasons}; ended by {load.stop_reason}\n{load.timeline()}")


def test_deploy_and_rollback_under_load_fail_no_request(demo_app) -> None:
    v1 = demo_app.head[:7]
    demo_app.deploy(check=True)
    slot1, body = demo_app.served()
    assert body["version"] == v1

    v2 = demo_app.commit("v2", {"app/RELEASE": "v2\n"})[:7]
    load, result, _ = run_during(demo_app.deploy, MIN_REQUESTS, port=demo_app.ports["proxy"],
                                 max_seconds=LOAD_MAX_SECONDS)
    print("deploy under load:", explain(load))
    assert result.returncode == 0, f"deploy failed:\n{result.stdout}\n{result.stderr}"
    slot2, body = demo_app.served()
    assert slot2 != slot1 and body["version"] == v2
    assert load.stop_reason == "stopped", "the load did not cover the whole deploy: " \
        + explain(load)
    assert load.sent >= MIN_REQUESTS, explain(load)
    assert load.failed == 0, explain(load)
    assert load.retried == 0, explain(load)
    assert load.ok == load.sent
    assert {f"{slot1}/{v1}", f"{slot2}/{v2}"} <= labels_seen(load), \
        "the switch did not happen under load: " + explain(load)
    assert set(load.slots_seen[-1][1]) == {f"{slot2}/{v2}"}, explain(load)

    load, result, _ = run_during(lambda: demo_app.inv("rollback", demo_app.env_flag),
                                 MIN_REQUESTS, port=demo_app.ports["proxy"],
                                 max_seconds=LOAD_MAX_SECONDS)
    print("rollback under load:", explain(load))
    assert result.returncode == 0, f"rollback failed:\n{result.stdout}\n{result.stderr}"
    assert load.stop_reason == "stopped", "the load did not cover the whole rollback: " \
        + explain(load)
    assert load.sent >= MIN_REQUESTS, explain(load)
    assert load.failed == 0, explain(load)
    assert load.retried == 0, explain(load)
    assert load.ok == load.sent
    assert {f"{slot2}/{v2}", f"{slot1}/{v1}"} <= labels_seen(load), explain(load)
    assert set(load.slots_seen[-1][1]) == {f"{slot1}/{v1}"}, \
        "traffic is not back on the first version: " + explain(load)
    slot, body = demo_app.served()
    assert (slot, body["version"]) == (slot1, v1)
