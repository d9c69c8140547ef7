"""Monitoring: the textfile's exact text, how each event changes it, reading it back, the
Grafana annotation's body and header, and that nothing here can fail an operation."""

from __future__ import annotations

import posixpath
from pathlib import Path
from types import SimpleNamespace

import pytest

from togather_tasks import commands as cmd
from togather_tasks import monitoring, notify
from togather_tasks.config import Settings
from togather_tasks.errors import ConfigError
from togather_tasks.monitoring import Metrics, after_event, label_value, parse, render

from .fakehost import FakeHost, FakeSession, failed, ok
from .projects import BASE_CONFIG, Project

TOKEN = "glsa_grafana-token-0123456789abcdef"  # noqa: S105 - a test value
FULL = Metrics(last_timestamp=1767225600, last_duration=42, last_success=1, rollbacks_total=2,
               failures_total=3, lock_held=0, version="abc1234")
FULL_TEXT = """\
# HELP togather_deploy_last_timestamp_seconds When the last deploy or rollback ended (Unix time), whatever its result.
# TYPE togather_deploy_last_timestamp_seconds gauge
togather_deploy_last_timestamp_seconds{app="shop",environment="staging"} 1767225600
# HELP togather_deploy_last_duration_seconds How long the last deploy or rollback took.
# TYPE togather_deploy_last_duration_seconds gauge
togather_deploy_last_duration_seconds{app="shop",environment="staging"} 42
# HELP togather_deploy_last_success 1 if the last deploy or rollback succeeded, 0 if it failed.
# TYPE togather_deploy_last_success gauge
togather_deploy_last_success{app="shop",environment="staging"} 1
# HELP togather_rollbacks_total Successful rollbacks.
# TYPE togather_rollbacks_total counter
togather_rollbacks_total{app="shop",environment="staging"} 2
# HELP togather_deploy_failures_total Failed deploys and rollbacks.
# TYPE togather_deploy_failures_total counter
togather_deploy_failures_total{app="shop",environment="staging"} 3
# HELP togather_lock_held 1 while a deploy or rollback holds the environment's lock (from its start to its end; it stays 1 after a run killed outright, whose lock is still held).
# TYPE togather_lock_held gauge
togather_lock_held{app="shop",environment="staging"} 0
# HELP togather_deployed_version_info The version serving traffic, as label `version`.
# TYPE togather_deployed_version_info gauge
togather_deployed_version_info{app="shop",environment="staging",version="abc1234"} 1
"""  # noqa: E501 - the exact file


# --- the text ----------------------------------------------------------------------------------


def test_render_writes_every_series_with_help_type_and_labels() -> None:
    assert render("shop", "staging", FULL) == FULL_TEXT


def test_render_leaves_out_what_is_not_known_yet() -> None:
    text = render("shop", "staging", after_event(Metrics(), "started", now=10, duration=0,
                                                 version="abc1234"))
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert samples == ['togather_rollbacks_total{app="shop",environment="staging"} 0',
                       'togather_deploy_failures_total{app="shop",environment="staging"} 0',
                       'togather_lock_held{app="shop",environment="staging"} 1']


def test_a_fraction_is_kept_and_a_whole_number_has_none() -> None:
    text = render("a", "b", Metrics(last_duration=1.5, last_timestamp=2.0))
    assert 'togather_deploy_last_duration_seconds{app="a",environment="b"} 1.5' in text
    assert 'togather_deploy_last_timestamp_seconds{app="a",environment="b"} 2\n' in text


def test_label_values_are_escaped_as_the_exposition_format_says() -> None:
    assert label_value('v"1\\2\n3') == 'v\\"1\\\\2\\n3'
    text = render("shop", "staging", Metrics(version='v"1\\2\n3'))
    assert 'version="v\\"1\\\\2\\n3"} 1\n' in text


# --- reading it back -----------------------------------------------------------------------------


ODD = Metrics(version='odd "v" \\ \n x', lock_held=1, last_duration=0.25)


@pytest.mark.parametrize("metrics", [FULL, Metrics(), ODD])
def test_parse_reads_back_what_render_wrote(metrics: Metrics) -> None:
    assert parse(render("shop", "staging", metrics)) == metrics


def test_parse_skips_what_it_cannot_read() -> None:
    text = ("garbage\n"
            'togather_rollbacks_total{app="shop",environment="staging"} NaNish\n'
            'togather_deploy_failures_total{app="shop",environment="staging"} 4\n'
            'other_metric{x="y"} 7\n')
    assert parse(text) == Metrics(failures_total=4)


# --- each event --------------------------------------------------------------------------------


def test_a_successful_deploy_ends_with_its_version_and_no_lock() -> None:
    started = after_event(FULL, "started", now=100, duration=0, version="new5678")
    assert started == Metrics(**{**FULL.__dict__, "lock_held": 1})

    completed = after_event(started, "completed", now=160, duration=60, version="new5678")
    assert completed == Metrics(last_timestamp=160, last_duration=60, last_success=1,
                                rollbacks_total=2, failures_total=3, lock_held=0,
                                version="new5678")


def test_a_failure_counts_and_keeps_the_version_that_serves() -> None:
    failed_ = after_event(FULL, "failed", now=200, duration=7, version="bad0000")
    assert failed_ == Metrics(last_timestamp=200, last_duration=7, last_success=0,
                              rollbacks_total=2, failures_total=4, lock_held=0,
                              version="abc1234")


def test_a_rollback_counts_and_names_the_version_it_brought_back() -> None:
    rolled = after_event(FULL, "rolled_back", now=300, duration=12, version="old0001")
    assert (rolled.rollbacks_total, rolled.failures_total, rolled.version,
            rolled.last_success) == (3, 3, "old0001", 1)


def test_an_unknown_event_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown event"):
        after_event(Metrics(), "exploded", now=0, duration=0, version=None)


# --- configuration --------------------------------------------------------------------------------


def with_monitoring(project: Project, block: str, **env: str | None) -> Settings:
    project.write_config(BASE_CONFIG + "monitoring:\n" + block)
    project.write_env("staging", **env)
    return project.load("staging")


def test_off_unless_configured(settings: Settings) -> None:
    assert monitoring.textfile_path(settings) is None


def test_a_relative_textfile_dir_is_inside_the_remote_directory(project: Project) -> None:
    settings = with_monitoring(project, "  textfile_dir: metrics\n")
    assert monitoring.textfile_path(settings) == \
        "/srv/togather/staging/metrics/togather_togather-test_staging.prom"


def test_an_absolute_textfile_dir_is_used_as_it_is(project: Project) -> None:
    settings = with_monitoring(project, "  textfile_dir: /var/lib/prometheus/node-exporter\n")
    assert monitoring.textfile_path(settings) == \
        "/var/lib/prometheus/node-exporter/togather_togather-test_staging.prom"


def test_an_environment_may_set_its_own_textfile_dir(project: Project) -> None:
    project.write_config(BASE_CONFIG.replace(
        "    ports: {proxy: 9080", "    monitoring: {textfile_dir: /m}\n    ports: {proxy: 9080"))
    project.write_env("production")
    assert monitoring.textfile_path(project.load("staging")).startswith("/m/")
    assert monitoring.textfile_path(project.load("production")) is None


@pytest.mark.parametrize("directory", ["../elsewhere", "metrics/../..", "a b", "$(id)"])
def test_a_textfile_dir_that_leaves_or_needs_quoting_is_refused(
        project: Project, directory: str) -> None:
    with pytest.raises(ConfigError, match="monitoring.textfile_dir"):
        with_monitoring(project, f"  textfile_dir: '{directory}'\n")


def test_grafana_needs_its_token_in_the_env_file(project: Project) -> None:
    with pytest.raises(ConfigError, match="DEPLOY_GRAFANA_TOKEN is required"):
        with_monitoring(project, "  grafana_url: https://grafana.example.com\n")


def test_the_grafana_token_is_redacted_like_every_secret(project: Project) -> None:
    settings = with_monitoring(project, "  grafana_url: https://grafana.example.com\n",
                               DEPLOY_GRAFANA_TOKEN=TOKEN)
    assert TOKEN not in settings.redactor()(f"Authorization: Bearer {TOKEN} / {TOKEN}")


# --- the Grafana annotation -------------------------------------------------------------------


def http_status(code: int) -> SimpleNamespace:
    """What notify.post_json reads of a requests.Response."""
    return SimpleNamespace(status_code=code)


def grafana_settings(project: Project) -> Settings:
    return with_monitoring(project, "  grafana_url: https://grafana.example.com/\n",
                           DEPLOY_GRAFANA_TOKEN=TOKEN)


def test_the_annotation_is_a_tagged_region_from_start_to_end(project: Project) -> None:
    body = monitoring.annotation(grafana_settings(project), "failed", operation="deploy",
                                 version="abc1234", by="alice@example.com",
                                 duration_seconds=30, step="health", now=1767225600.5)
    assert body == {
        "time": 1767225570500,
        "timeEnd": 1767225600500,
        "tags": ["togather", "app:togather-test", "environment:staging", "event:failed"],
        "text": "togather-test staging: deploy abc1234 by alice@example.com: failed at health",
    }


def test_the_token_goes_in_the_authorization_header_only(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = FakeSession(grafana_settings(project), tmp_path / "state")
    posted = []
    monkeypatch.setattr(notify.requests, "post", lambda url, json, **kw: posted.append(
        (url, json, kw["headers"])) or http_status(200))

    monitoring.record(session, "rolled_back", operation="rollback", by="alice@example.com",
                      duration_seconds=5, version="old0001", deployment_id="dep_x")

    [(url, body, headers)] = posted
    assert url == "https://grafana.example.com/api/annotations"
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert body["text"] == ("togather-test staging: rollback old0001 by alice@example.com: "
                            "succeeded")
    assert TOKEN not in str(body) + url + session.output


def test_started_gets_no_annotation(project: Project, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    session = FakeSession(grafana_settings(project), tmp_path / "state")
    monkeypatch.setattr(notify.requests, "post", lambda *a, **kw: pytest.fail("posted"))
    monitoring.record(session, "started", operation="deploy", by="a@b.c", duration_seconds=0)


def test_a_refused_annotation_is_a_warning_without_the_token(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = FakeSession(grafana_settings(project), tmp_path / "state")
    calls = []
    monkeypatch.setattr(notify.requests, "post",
                        lambda *a, **kw: calls.append(1) or http_status(401))

    monitoring.record(session, "completed", operation="deploy", by="a@b.c",
                      duration_seconds=3, version="abc1234")

    assert len(calls) == 1  # a 401 is not retried
    assert "Grafana annotation 'completed' failed (HTTP 401)" in session.output
    assert TOKEN not in session.output


# --- the textfile on the hosts --------------------------------------------------------------------


PATH = "/srv/togather/staging/metrics/togather_togather-test_staging.prom"


@pytest.fixture
def metrics_session(project: Project, tmp_path: Path) -> FakeSession:
    session = FakeSession(with_monitoring(project, "  textfile_dir: metrics\n"),
                          tmp_path / "state")
    session.all_hosts = [session.primary, FakeHost("web2")]
    session.primary.on("if [ -e", lambda command: ok(
        session.primary.files.get(PATH, b"").decode()))
    return session


def test_every_host_gets_the_same_file_with_counters_from_the_primary(
        metrics_session: FakeSession) -> None:
    primary, other = metrics_session.all_hosts
    primary.files[PATH] = render("togather-test", "staging", FULL).encode()
    other.files[PATH] = b"stale"

    monitoring.record(metrics_session, "failed", operation="deploy", by="a@b.c",
                      duration_seconds=9, version="bad0000", step="health", message="x")

    assert primary.ran(cmd.read_if_exists_command(PATH))
    assert other.files[PATH] == primary.files[PATH]
    written = parse(primary.files[PATH].decode())
    assert (written.failures_total, written.last_success, written.version) == (4, 0, "abc1234")
    for host in metrics_session.all_hosts:
        assert host.ran(cmd.make_dirs(posixpath.dirname(PATH)))


def test_a_host_that_cannot_be_written_is_a_warning_and_the_others_are_written(
        metrics_session: FakeSession) -> None:
    primary, other = metrics_session.all_hosts
    primary.on("mkdir -p", failed("Permission denied"))

    monitoring.record(metrics_session, "completed", operation="deploy", by="a@b.c",
                      duration_seconds=9, version="abc1234")

    assert PATH not in primary.files
    assert parse(other.files[PATH].decode()).version == "abc1234"
    assert "could not write the metrics file" in metrics_session.output
    assert "on web1" in metrics_session.output


def test_an_unreadable_primary_is_a_warning_and_nothing_is_written(
        metrics_session: FakeSession) -> None:
    metrics_session.primary.on("if [ -e", failed("Input/output error"))

    monitoring.record(metrics_session, "completed", operation="deploy", by="a@b.c",
                      duration_seconds=9, version="abc1234")

    assert all(PATH not in host.files for host in metrics_session.all_hosts)
    assert "could not write the metrics file (CommandError" in metrics_session.output
    assert "the operation is not affected" in metrics_session.output


# --- commands -------------------------------------------------------------------------------------


def test_the_metrics_read_command_quotes_its_path() -> None:
    assert cmd.read_if_exists_command("/m d/f.prom") == \
        "if [ -e '/m d/f.prom' ]; then cat -- '/m d/f.prom'; fi"
