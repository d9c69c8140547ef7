"""Where the time of a deploy goes, on the real test bed (staging over SSH).

A first deploy on an empty remote directory and database, then a second deploy of a new
commit, each split into: image build, waiting for the app to become healthy, the configured
drain before the old slot stops, and everything else (the tool's own overhead), plus the number
of SSH connections opened. Then, for what an empty *engine* would add, a build of the app image
and of the proxy image with --no-cache.

    python bench/deploy_timing.py

Prints figures; asserts nothing (it is a benchmark). Cleans up after itself.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runlog  # noqa: E402
from zero_downtime import BenchApp, must, preflight, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed_deploy(app: BenchApp, label: str, drain_seconds: float
                 ) -> dict[str, float | int | str]:
    before = set(app.log_dir.glob("*.log"))
    start = time.monotonic()
    out = must(app.inv("deploy", f"--env={app.env}", timeout=900), f"inv deploy ({label})")
    wall = time.monotonic() - start
    steps, _ = runlog.step_seconds(app.log_dir, app.env, before)
    connections = runlog.ssh_connections(out.output) or 0
    drain = drain_seconds if label != "first" else 0.0  # a first deploy has no old slot
    build = steps.get("build", 0.0)
    health = steps.get("health", 0.0)
    return {"label": label, "wall": wall, "build": build, "health": health, "drain": drain,
            "other": wall - build - health - drain, "connections": connections,
            "steps": " ".join(f"{k}={v:.2f}" for k, v in steps.items())}


def cold_build_seconds(context: Path, dockerfile: str, tag: str) -> float:
    start = time.monotonic()
    must(run(["docker", "build", "--no-cache", "--quiet", "-t", tag, "-f",
              str(context / dockerfile), str(context)], timeout=900), f"docker build {tag}")
    seconds = time.monotonic() - start
    run(["docker", "image", "rm", tag], timeout=120)
    return seconds


def main() -> int:
    preflight()
    app = BenchApp(Path(tempfile.mkdtemp(prefix="togather-timing-")))
    rows = []
    try:
        app.setup()
        import yaml
        config = yaml.safe_load((app.repo / "config" / "deployment.yml").read_text())
        drain = float(config["deployment"]["drain_seconds"])
        rows.append(timed_deploy(app, "first", drain))
        app.commit("v2")
        rows.append(timed_deploy(app, "second", drain))
        cold_app = cold_build_seconds(app.repo, "app/Dockerfile", "togather-timing:app")
        cold_proxy = cold_build_seconds(REPO / "docker" / "nginx", "Dockerfile",
                                        "togather-timing:proxy")
    finally:
        leftovers = app.cleanup()
    print(f"{'deploy':<8} {'wall_s':>7} {'build_s':>8} {'health_s':>9} {'drain_s':>8} "
          f"{'other_s':>8} {'ssh':>4}")
    for r in rows:
        print(f"{r['label']:<8} {r['wall']:7.2f} {r['build']:8.2f} {r['health']:9.2f} "
              f"{r['drain']:8.2f} {r['other']:8.2f} {r['connections']:4d}")
    for r in rows:
        print(f"  {r['label']} steps (s): {r['steps']}")
    print("other = wall - build - health - drain: validation, lock, uploads, snapshot, "
          "migrations, compose start, nginx switch and verification, state writes, Python "
          "start-up")
    print(f"cold builds on an empty engine (--no-cache): app image {cold_app:.1f} s, "
          f"proxy image {cold_proxy:.1f} s")
    for line in leftovers:
        print(f"left over, remove by hand: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
