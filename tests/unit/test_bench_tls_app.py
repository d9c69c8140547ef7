"""bench/tls_app.py: the self-signed pair the HTTPS benchmarks give their throwaway app is one
the tool's own `proxy.tls` checks accept (else every HTTPS bench run would stop at
config.validate), and its key is not readable by others."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from togather_tasks import tls

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture()
def tls_app(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import tls_app as module

    yield module
    for name in ("tls_app", "zero_downtime", "loadgen"):
        sys.modules.pop(name, None)


def test_the_generated_pair_passes_the_proxy_tls_checks(tmp_path, tls_app) -> None:
    crt, key = tls_app.self_signed(tmp_path / "tls")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    raw = {"certificate": str(crt), "key": str(key), "redirect": False}
    assert tls.problems(raw, tmp_path, "environments.staging.proxy.tls") == []
    settings = tls.resolve(raw, tmp_path, 9443)
    assert settings.domains == (tls_app.DOMAIN,)
    assert not settings.redirect


def test_a_second_pair_never_overwrites_a_key(tmp_path, tls_app) -> None:
    tls_app.self_signed(tmp_path / "tls")
    with pytest.raises(FileExistsError):
        tls_app.self_signed(tmp_path / "tls")


def test_the_app_environment_names_the_pair_and_an_https_port(tmp_path, tls_app) -> None:
    app = tls_app.TlsBenchApp(tmp_path)
    app.ports = app.pick_ports()
    env = app.environment()
    assert set(app.ports) == {"proxy", "blue", "green", "https"}
    assert len(set(app.ports.values())) == 4
    assert env["proxy"]["tls"] == {"certificate": str(tmp_path / "tls" / "site.crt"),
                                   "key": str(tmp_path / "tls" / "site.key"),
                                   "redirect": False}
    assert env["ports"]["https"] == app.ports["https"]
