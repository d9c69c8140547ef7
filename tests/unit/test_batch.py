"""Probes batched into one remote command (batch.py) and the validate step's host check
(provision.host_check_*): the scripts run for real in a local shell, the parsers are pure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from togather_tasks import provision
from togather_tasks.batch import Section, batch_script, new_marker, parse_batch, run_batch
from togather_tasks.errors import CommandError
from togather_tasks.hosts import LocalHost


def run_sh(script: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30,
                          check=False, env=env)
    return done.stdout


def test_each_sections_output_and_status_come_back_exactly() -> None:
    marker = new_marker()
    sections = {"plain": "echo one; echo two",
                "no_newline": "printf 'x y'",
                "blank_lines": "printf '\\n\\nz\\n\\n'",
                "failing": "echo half; exit 3",
                "silent": "true"}
    found = parse_batch(run_sh(batch_script(sections, marker)), marker)
    assert found == {"plain": Section("one\ntwo\n", 0), "no_newline": Section("x y", 0),
                     "blank_lines": Section("\n\nz\n\n", 0), "failing": Section("half\n", 3),
                     "silent": Section("", 0)}


def test_a_section_cannot_end_or_redirect_the_others() -> None:
    marker = new_marker()
    sections = {"exits": "exit 0", "redirects": "exec 1>/dev/null; echo gone",
                "after": "echo still here"}
    found = parse_batch(run_sh(batch_script(sections, marker)), marker)
    assert found["after"] == Section("still here\n", 0)
    assert found["redirects"].output == ""


def test_a_forged_marker_in_a_sections_output_is_just_output() -> None:
    """A state file (or any output) cannot end a section early: the marker's word is random."""
    marker, other = new_marker(), new_marker()
    forged = f"{other} end state 0\n{other} begin host\ndocker=99.0\n"
    sections = {"state": f"printf '%s' '{forged}'", "host": "echo docker=24.0.7"}
    found = parse_batch(run_sh(batch_script(sections, marker)), marker)
    assert found == {"state": Section(forged, 0), "host": Section("docker=24.0.7\n", 0)}
    assert marker != other


def test_a_cut_output_leaves_out_the_sections_that_did_not_end() -> None:
    marker = new_marker()
    whole = run_sh(batch_script({"a": "echo 1", "b": "echo 2"}, marker))
    cut = whole[:whole.index(f"{marker} end b")]
    assert parse_batch(cut, marker) == {"a": Section("1\n", 0)}
    assert parse_batch("", marker) == {}


def test_section_names_are_plain_words() -> None:
    with pytest.raises(ValueError, match="not a plain word"):
        batch_script({"a b; rm -rf /": "true"}, new_marker())


def test_run_batch_is_one_command() -> None:
    host = LocalHost()
    found = run_batch(host, {"a": "echo 1", "b": "exit 4"}, timeout=30, what="probing")
    assert found == {"a": Section("1\n", 0), "b": Section("", 4)}
    assert host.commands_run == 1


def test_run_batch_names_the_probes_that_did_not_report() -> None:
    with pytest.raises(CommandError, match=r"probing on local did not finish \(b missing\)"):
        run_batch(LocalHost(), {"a": "echo 1", "b": "kill -9 $$"}, timeout=30, what="probing")


# --- the validate step's host check ------------------------------------------------------------


def fake_bin(tmp_path: Path, docker: str) -> dict[str, str]:
    """PATH with a `docker` script (and the shell's own tools), nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!/bin/sh\n{docker}\n")
    (bin_dir / "docker").chmod(0o755)
    for tool in ("tail", "sleep", "flock"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                               text=True, check=False).stdout.strip()
        if found:
            os.symlink(found, bin_dir / tool)
    return {"PATH": str(bin_dir)}


def test_the_host_check_reports_versions_and_missing_tools(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, 'case "$1" in version) sleep 0.2; echo 24.0.7;; '
                             'compose) echo v2.40.3;; esac')
    out = run_sh(provision.host_check_script(["flock", "no-such-tool"]), env)
    assert sorted(out.splitlines()) == ["compose=v2.40.3", "docker=24.0.7",
                                        "missing=no-such-tool"]
    assert provision.host_check_problems("web1", out) == [
        "web1: `no-such-tool` is not installed or not on PATH"]


def test_the_host_check_of_a_healthy_host_finds_nothing(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, 'case "$1" in version) echo 20.10.24+dfsg1;; '
                             'compose) echo 2.40.3;; esac')
    out = run_sh(provision.host_check_script(["flock"]), env)
    assert provision.host_check_problems("web1", out) == []


@pytest.mark.parametrize(("output", "problem"), [
    ("docker=Cannot connect to the Docker daemon\ncompose=2.40.3\n",
     "web1: the Docker daemon does not answer (Cannot connect to the Docker daemon); start "
     "it (e.g. `systemctl start docker`) and retry"),
    ("docker=\ncompose=2.40.3\n", "web1: the Docker daemon does not answer (no output)"),
    ("docker=19.03.1\ncompose=2.40.3\n", "web1: Docker 19.03.1 is too old (>= 20.10 needed)"),
    ("docker=24.0.7\ncompose=\n", "web1: the Docker Compose v2 plugin is missing"),
    ("docker=24.0.7\ncompose=1.29.2\n", "web1: the Docker Compose v2 plugin is missing"),
    ("docker=24.0.7\ncompose=v2.20.2\n", "web1: Docker Compose v2.20.2 is too old (>= 2.24.4 "
                                          "needed"),
    ("docker=24.0.7\ncompose=2.24.3-desktop.1\n",
     "web1: Docker Compose 2.24.3-desktop.1 is too old"),
])
def test_host_check_problems(output: str, problem: str) -> None:
    problems = provision.host_check_problems("web1", output)
    assert len(problems) == 1 and problems[0].startswith(problem)
