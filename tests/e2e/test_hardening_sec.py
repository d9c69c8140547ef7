"""Issue 8, secrets and trust: host keys shown before they are trusted, `--fingerprint` for
scripts, `@revoked` enforced and `@cert-authority` lines harmless in known_hosts."""

from __future__ import annotations

import subprocess
from pathlib import Path

TESTBED_KNOWN_HOSTS = Path.home() / ".ssh" / "togather_testbed_known_hosts"


def _ssh_env(app, tmp_path: Path, known_hosts: Path, *, extra: str = "") -> dict[str, str | None]:
    """A copy of the test bed's ssh settings under a fresh alias, pointing at `known_hosts`."""
    alias = f"e2e-sec-{app.hex}"
    config = tmp_path / "ssh_config"
    config.write_text(f"""Host {alias}
  HostName 127.0.0.1
  Port 2222
  User deploy
  IdentityFile {Path.home() / '.ssh' / 'togather_testbed_ed25519'}
  IdentitiesOnly yes
  UserKnownHostsFile {known_hosts}
{extra}""")
    config.chmod(0o600)
    app.write_config(environments={app.env: {"hosts": [alias]}})
    return {"TOGATHER_SSH_CONFIG": str(config), "SSH_AUTH_SOCK": None}


def _testbed_key() -> tuple[str, str, str]:
    """(type, base64, SHA256 fingerprint as ssh-keygen prints it) of the test bed's sshd."""
    line = TESTBED_KNOWN_HOSTS.read_text().split()
    listed = subprocess.run(["ssh-keygen", "-lf", str(TESTBED_KNOWN_HOSTS)], check=True,
                            capture_output=True, text=True, timeout=30).stdout.split()
    return line[1], line[2], listed[1]


def test_trust_shows_the_fingerprint_and_checks_the_one_given(demo_app, tmp_path, cli_failure):
    app = demo_app
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    env = _ssh_env(app, tmp_path, known_hosts)
    key_type, key, fingerprint = _testbed_key()

    # Non-interactive without a decision: the fingerprint is shown, nothing is recorded.
    undecided = app.inv("hosts.trust", app.env_flag, env=env)
    cli_failure(undecided, contains="--fingerprint", code=2)
    assert f"{key_type} {fingerprint}" in undecided.stdout
    assert known_hosts.read_text() == ""

    wrong = app.inv("hosts.trust", app.env_flag, "--fingerprint=SHA256:" + "A" * 43, env=env)
    cli_failure(wrong, contains=f"is {fingerprint}, not the expected")
    assert known_hosts.read_text() == ""

    right = app.inv("hosts.trust", app.env_flag, f"--fingerprint={fingerprint}", env=env)
    assert right.returncode == 0, right.stdout + right.stderr
    assert fingerprint in right.stdout
    assert [key_type, key] in [line.split()[1:3] for line in known_hosts.read_text().splitlines()]
    assert app.inv("lock.status", app.env_flag, env=env).returncode == 0


def test_revoked_key_is_refused_and_cert_authority_lines_do_not_crash(demo_app, tmp_path,
                                                                      cli_failure):
    app = demo_app
    key_type, key, fingerprint = _testbed_key()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(TESTBED_KNOWN_HOSTS.read_text()
                           + f"@cert-authority *.example.com {key_type} {key}\n")
    env = _ssh_env(app, tmp_path, known_hosts)
    status = app.inv("lock.status", app.env_flag, env=env)
    assert status.returncode == 0, status.stdout + status.stderr

    known_hosts.write_text(known_hosts.read_text() + f"@revoked * {key_type} {key}\n")
    revoked = app.inv("lock.status", app.env_flag, env=env)
    cli_failure(revoked, contains="REVOKED")
    assert fingerprint in revoked.stderr
    # hosts.trust never records a revoked key either.
    before = known_hosts.read_text()
    cli_failure(app.inv("hosts.trust", app.env_flag, "--yes", env=env), contains="REVOKED")
    assert known_hosts.read_text() == before


def test_unknown_key_with_only_a_cert_authority_says_certificates_are_unsupported(
        demo_app, tmp_path, cli_failure):
    app = demo_app
    key_type, key, _ = _testbed_key()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority * {key_type} {key}\n")
    env = _ssh_env(app, tmp_path, known_hosts)
    result = app.inv("lock.status", app.env_flag, env=env)
    cli_failure(result, contains="unknown host key")
    assert "certificates (@cert-authority lines) are not supported" in result.stderr


def test_deploy_over_ssh_with_forward_agent_yes_in_the_ssh_config(demo_app, tmp_path):
    # The whole deploy (health gate and proxy checks read HTTP through SSH channels, bounded
    # now) works with an ssh config that asks for agent forwarding; the agent is not forwarded
    # (tests/unit/test_hosts.py checks the connection objects).
    app = demo_app
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(TESTBED_KNOWN_HOSTS.read_text())
    env = _ssh_env(app, tmp_path, known_hosts, extra="  ForwardAgent yes\n")
    result = app.deploy(env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert app.served()[0] in ("blue", "green")
    app.assert_no_secrets()
