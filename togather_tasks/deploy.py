"""The deploy (SPEC section 5), read top to bottom like the runbook; the table at the end of
this module (Deploy.steps) is the order:

validate -> lock -> build -> snapshot -> migrate -> start -> health -> switch -> record -> finish

build, start and health run on every host at once; snapshot and migrations once, on the
primary, before any slot starts. Until `switch` succeeds on every host, traffic never leaves
the old slot: any failure switches back the hosts that did switch, stops the new slot where no
proxy routes to it, records the failed deployment, releases the lock and exits with the step's
code. After it, the deploy has happened; later problems are reported, never undone.
"""

from __future__ import annotations

import io
import os
import shlex
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from . import batch, certs, cleanup, fleet, images, provision, proxy, slots, snapshots, source
from . import commands as cmd
from .config import Settings
from .errors import CommandTimeoutError, ConfigError, MigrationError, TogatherError
from .hosts import Host, Result
from .operation import Release, SlotOperation, Step
from .output import StepNote
from .session import Session
from .slots import Slots
from .state import new_deployment, utc_now
from .ulid import new_id

q = shlex.quote


def describe_pending(pending: list[str] | None) -> str:
    if pending is None:
        return "the migration command (it cannot list what is pending)"
    if not pending:
        return "no pending migration (database.snapshot: always)"
    return f"{len(pending)} pending: {', '.join(pending[:5])}" + (" ..." if len(pending) > 5
                                                                  else "")


@dataclass
class DeployOptions:
    ref: str = "HEAD"
    dry_run: bool = False
    force: bool = False
    skip_migrations: bool = False
    lock_wait: int = 0


@dataclass(frozen=True)
class Migrations:
    """What the snapshot step found and took, and what the migrate step applied."""

    pending: list[str] | None = None
    snapshot: str | None = None
    applied: int = 0


@dataclass
class DeployResult:
    deployment: dict[str, Any]
    timings: dict[str, float]
    log_path: str | None
    ssh_connections: int
    plan: list[str] = field(default_factory=list)


def certificate_plan(settings: Settings, host: str) -> list[str]:
    """The dry run's line for the certs step on `host` (none without proxy.tls)."""
    settings_tls = settings.tls
    if settings_tls is None:
        return []
    if settings_tls.acme is None:
        how = f"upload {settings_tls.certificate} and its key (mode 600) unless installed"
    else:
        peers = settings_tls.acme.peers
        how = (f"obtain a certificate for {', '.join(settings_tls.domains)} from "
               f"{settings_tls.acme.directory} (HTTP-01) unless the host has one"
               + (f"; a challenge token this host does not hold is asked of its peers "
                  f"{', '.join(peers)} (one hop)" if peers else "")
               + "; " + certs.start_renewer(settings))
    return [f"[{host}] HTTPS: write {cmd.Layout(settings.remote_dir).site_file} with "
            f"the ACME challenge location (nginx -t and reload if it changed); {how}"]


class Deploy(SlotOperation):
    operation = "deploy"

    def __init__(self, session: Session, options: DeployOptions) -> None:
        self.options = options
        super().__init__(session, dry_run=options.dry_run)
        self.deployment_id = new_id("dep")
        self.started_at: datetime = utc_now()
        self.db = Migrations()
        self.image_digest: str | None = None

    @property
    def migrations_enabled(self) -> bool:
        return (not self.options.skip_migrations
                and self.settings.database["migration_tool"] != "none")

    # --- the runbook ----------------------------------------------------------------------

    def run(self) -> DeployResult:
        self.s.log.event("deploy_start", deployment_id=self.deployment_id, ref=self.options.ref,
                         environment=self.settings.env, dry_run=self.options.dry_run)
        self.run_steps(self.runbook[:1])
        if self.options.dry_run:
            plan = self.plan()
            return DeployResult({}, self.progress.timings, self._log_path(),
                                self.s.ssh_connections(), plan)
        self.run_hook("pre-deploy", "starting", blocking=True)
        self.run_steps(self.runbook[1:])
        self.s.audit(operation="deploy", deployment_id=self.deployment_id,
                     version=self.release.sha7, result="succeeded", slot=self.slots.new,
                     seconds=self.elapsed())
        self.run_hook("post-deploy", "succeeded")
        self.notify("completed")
        return DeployResult(self.state.current if self.state else {}, self.progress.timings,
                            self._log_path(), self.s.ssh_connections())

    def validate(self, note: StepNote) -> None:
        """Step: nothing changes anywhere; every host answers, or the deploy stops here
        naming the one that does not."""
        for warning in self.settings.warnings:
            self.s.console.warn(warning)
        source.refresh(self.settings.source_url)
        commit = source.resolve_ref(self.settings.source_root, self.options.ref)
        self.release = Release(commit, cmd.image_ref(self.settings, commit[:7]))
        self.check_tree()
        if source.uncommitted_changes(self.settings.source_root):
            self.s.console.warn("the working tree has uncommitted changes; they are not "
                                f"deployed (building commit {self.release.sha7})")
        self.on_hosts("validate", lambda host: self.check_host(
            host, primary=host.name == self.settings.primary_host))
        self.state = self.s.store.known().state  # read with the primary's check
        self.slots = Slots(self.state.next_slot(), self.state.active_slot)
        if self.migrations_enabled:
            self.check_database()
        note(f"{self.release.sha7} -> {self.settings.env} ({', '.join(self.settings.hosts)}), "
             f"{self.target_label()}")

    def target_label(self) -> str:
        """What this deploy replaces on the hosts, for the operator: the slot it starts."""
        return f"slot {self.slots.new}"

    def check_tree(self) -> None:
        root, build, sha7 = self.settings.source_root, self.settings.build, self.release.sha7
        dockerfile = f"{build['context'].rstrip('/')}/{build['dockerfile']}" \
            if build["context"] not in (".", "./") else build["dockerfile"]
        problems = []
        if not source.has_path(root, self.release.commit, dockerfile):
            problems.append(f"commit {sha7} has no {dockerfile} (build.dockerfile, "
                            "relative to build.context)")
        if self.migrations_enabled and self.settings.migrates_on_host and not source.has_path(
                root, self.release.commit, self.settings.database["migrations_path"]):
            problems.append(f"commit {sha7} has no "
                            f"{self.settings.database['migrations_path']} "
                            "(database.migrations_path); use --skip-migrations or fix the path")
        if problems:
            raise ConfigError(problems)

    def check_host(self, host: Host, *, primary: bool) -> None:
        """One command per host: its tools and versions, and on the host that holds the state
        file (the primary) also the state (read here rather than in a command of its own)."""
        tools = list(provision.HOST_TOOLS)
        if primary and self.migrations_enabled and self.settings.has_database:
            tools += provision.DATABASE_TOOLS
            binary = cmd.migration_tool_binary(self.settings.database["migration_tool"])
            if binary:
                tools.append(binary)
        probes = {"host": provision.host_check_script(tools)}
        holds_state = self.s.store.host is host
        if holds_state:
            probes["state"] = self.s.store.read_command
        found = batch.run_batch(host, probes, timeout=60, what="checking the host")
        problems = provision.host_check_problems(host.name, found["host"].output)
        if problems:
            raise TogatherError("; ".join(problems),
                                hint="Nothing was changed. Fix the host and retry.")
        if holds_state and found["state"].ok:
            self.s.store.adopt(found["state"].output)
        elif holds_state:  # e.g. the flock timed out: read again, failing with its own error
            self.s.store.read()

    def check_database(self) -> None:
        """Read-only: golang-migrate's dirty flag must be clear before we touch anything."""
        if self.settings.database["migration_tool"] != "golang-migrate":
            return
        row = self.golang_migrate_row()
        if not row:
            return
        version, _, dirty = row.partition("|")
        if dirty.strip() == "t":
            url = cmd.passwordless_url(self.settings)
            env = cmd.pg_env(self.settings)
            raise MigrationError(
                f"the database is dirty: migration {version} failed part-way in an earlier "
                "run; refusing to migrate (nothing was changed)",
                hint=("Recover by hand on the database host, then deploy again:\n"
                      f"  1. inspect what migration {version} changed and repair or undo it\n"
                      f"  2. mark the last fully applied version: {env} migrate -path "
                      f"<migrations> -database {q(url)} force <VERSION>\n"
                      f"     ({version} if it did apply completely, the one before it "
                      "otherwise)\n"
                      f"  or restore the last snapshot: inv db.snapshots --env="
                      f"{self.settings.env}; inv db.restore --env={self.settings.env} "
                      "--snapshot=NAME"))

    def golang_migrate_row(self) -> str:
        """`version|t` or `version|f` from schema_migrations; empty before the first run."""
        line = cmd.pgpass_line(self.settings.migrate_database_url).encode()
        result = self.s.primary.stream_into(cmd.dirty_check_command(self.settings),
                                            io.BytesIO(line), timeout=60)
        if not result.ok:
            raise MigrationError(f"cannot read schema_migrations on {self.s.primary.name}: "
                                 f"{result.stderr.strip().splitlines()[-1:] or ['no output']}")
        return result.stdout.strip()

    def plan(self) -> list[str]:
        """Every remote command the deploy would run (secrets are never in them)."""
        st, layout = self.settings, cmd.Layout(self.settings.remote_dir)
        release, new, old = self.release, self.slots.new, self.slots.old
        primary = st.primary_host
        build = images.Build(st, release.commit, self.started_at)
        lines = [f"[{primary}] lock {st.state_path} (compare-and-swap under flock)",
                 *images.publish_plan(build)]
        for host in st.hosts:
            lines += [
                f"[{host}] {cmd.host_directories(layout)}",
                f"[{host}] upload {layout.compose_file} (mode 644), {layout.app_env} "
                f"(secrets, mode 600)",
                f"[{host}] upload git archive of {release.sha7} to "
                f"{layout.release(release.sha7)}",
                f"[{host}] " + images.host_plan(build),
            ]
        if self.migrations_enabled:
            lines += self.migration_plan(primary, layout)
        if self.rolling_batch:
            waves = fleet.waves(st.hosts, self.rolling_batch)
            lines.append("[rolling] waves in host order: " + " | ".join(
                ", ".join(wave) for wave in waves) + "; each wave: start, health, switch, then "
                "health through its proxies before the next (instead of every host at once)")
        when = ("every host of its wave is" if self.rolling_batch
                else "every host is" if len(st.hosts) > 1 else "it is")
        for host in st.hosts:
            lines += [
                f"[{host}] unless the edge network exists, its subnet {st.edge_subnet} "
                f"against the host's routes: {cmd.edge_routes(st)}",
                f"[{host}] write {layout.slots_env} ({new.upper()}_IMAGE={release.image})",
                f"[{host}] " + cmd.start_slot(st, new, "never"),
                f"[{host}] GET 127.0.0.1:{st.ports[new]}{st.health_endpoint} until "
                f"healthy (<= {st.health.retries} checks)",
                *self.certificate_plan(host),
                f"[{host}] when {when} healthy: write {layout.site_file} (nginx -t "
                f"and reload only if it changed); rename the slot marker to "
                f"{layout.slot_marker(new)}; verify through the proxy",
            ]
            if old:
                lines.append(f"[{host}] after {st.deployment['drain_seconds']}s: "
                             + cmd.stop_slot(st, old))
        lines.append(f"[{primary}] record {self.deployment_id} in {st.state_path}; release the "
                     "lock")
        return lines

    def certificate_plan(self, host: str) -> list[str]:
        return certificate_plan(self.settings, host)

    def migration_plan(self, primary: str, layout: cmd.Layout) -> list[str]:
        st, sha7 = self.settings, self.release.sha7
        directory = f"{layout.release(sha7)}/{st.database['migrations_path']}"
        snap = snapshots.snapshot_name(st.env, "<UTC>", sha7)
        # A custom command cannot list what is pending: snapshot and run it every time.
        known = st.database["migration_tool"] in ("dbmate", "golang-migrate")
        pending = "if a migration is pending: " if known else ""
        when = pending if st.database["snapshot"] == "when-migrating" else ""
        lines = [f"[{primary}] upload {layout.pgpass} (database password, mode 600)"
                 ] if st.has_database else []
        if st.database["migration_tool"] == "dbmate":
            lines.append(f"[{primary}] pending migrations (read-only): "
                         + cmd.dbmate_status_command(st, directory))
        elif st.database["migration_tool"] == "golang-migrate":
            lines.append(f"[{primary}] pending migrations (read-only): schema_migrations "
                         f"version vs {st.database['migrations_path']}/*.up.sql of {sha7}")
        if st.has_database:
            lines.append(f"[{primary}] {when}"
                         + cmd.snapshot_command(st, f"{st.snapshot_dir}/{snap}"))
        return [*lines,
                f"[{primary}] {pending}" + cmd.migrate_command(st, directory, self.release.image)]

    def acquire_lock(self, note: StepNote) -> None:
        """Step: the lock, then (re-read under it) the state and the slots every host's proxy
        agrees on."""
        self.take_lock(self.deployment_id, force=self.options.force,
                       lock_wait=self.options.lock_wait)
        self.state = self.s.store.known().state  # as our lock's compare-and-swap wrote it
        self.settle_slots(self.state)
        note(f"{self.lock['lock_id']} held by {self.lock['locked_by']}")
        self.notify("started")

    def build(self, note: StepNote) -> None:
        """Step: the image published once (the registry strategy: built and pushed, or
        reused), then on every host at once (with the host files it runs with)."""
        build = images.Build(self.settings, self.release.commit, self.started_at)
        published = images.publish(build, self.s)
        self.image_digest = published.digest
        outcomes = self.on_hosts("build", lambda host: self.put_image(build, host, published))
        built = [name for name, outcome in outcomes.items() if outcome.value]
        made = "pulled on" if published.digest else "built on"
        note(f"{published.label} " + (f"{made} {', '.join(built)}" if built else "reused")
             + f" ({fleet.summary(outcomes)})")

    def put_image(self, build: images.Build, host: Host, published: images.Published) -> bool:
        """The host's files, the image and the proxy image on one host. True when the image
        had to be built, shipped or pulled."""
        slots.prepare_host(self.settings, host, primary=host.name == self.settings.primary_host)
        built = images.ensure_on_host(build, host, published)
        proxy.ensure_image(self.settings, host, self.settings.build["timeout"])
        if self.settings.tls:
            certs.prepare(self.settings, host)
        return built

    def snapshot(self, note: StepNote) -> None:
        """Step: find the pending migrations (read-only, under the lock, so no other deploy or
        restore can change the answer), and dump the database only if one will be applied:
        a dump protects nothing when the schema and data stay as they are."""
        if not self.migrations_enabled:
            note("skipped (--skip-migrations)" if self.options.skip_migrations
                 else "skipped (no migration tool)")
            return
        if not self.settings.has_database:
            note("skipped (no DATABASE_URL: nothing to dump)")
            return
        pending = self.find_pending()
        self.db = Migrations(pending)
        if pending == [] and self.settings.database["snapshot"] == "when-migrating":
            note("skipped (no pending migration)")
            return
        path, size = snapshots.take_snapshot(self.s, self.release.sha7, self.state)
        self.db = Migrations(pending, path)
        note(f"{path} ({size // 1024} KiB, verified) before {describe_pending(pending)}")

    def find_pending(self) -> list[str] | None:
        """Migrations of this commit that the database has not applied; None when the tool
        cannot tell (custom command): then it is snapshotted and run every time."""
        tool = self.settings.database["migration_tool"]
        if tool == "golang-migrate":
            version = self.golang_migrate_row().partition("|")[0].strip()
            files = source.list_dir(self.settings.source_root, self.release.commit,
                                    self.settings.database["migrations_path"])
            return cmd.golang_migrate_pending(files, int(version) if version else None)
        if tool != "dbmate":
            return None
        result = self.s.primary.run(cmd.dbmate_status_command(self.settings,
                                                              self.migrations_dir),
                                    timeout=90, check=False)
        if not result.ok:
            raise TogatherError(
                cmd.bounded("cannot tell which migrations are pending: " + cmd.tool_error(
                    result.stdout, result.stderr, result.exit_status), self.s.redact),
                hint="Nothing was migrated or switched. Check that the database is up and "
                     "reachable with the settings of DATABASE_URL (DEPLOY_DATABASE_URL).")
        return cmd.parse_dbmate_status(result.stdout)

    @property
    def migrations_dir(self) -> str:
        release_dir = cmd.Layout(self.settings.remote_dir).release(self.release.sha7)
        return f"{release_dir}/{self.settings.database['migrations_path']}"

    def migrate(self, note: StepNote) -> None:
        """Step: once, on the primary, before any new slot starts."""
        if not self.migrations_enabled:
            note("skipped")
            return
        if self.db.pending == []:
            # Safe to skip: the tool itself (or schema_migrations under our lock) said
            # there is nothing to apply; and should that answer ever be wrong, skipping
            # fails the health gate with the data untouched, where running the tool would
            # migrate without the snapshot that was skipped.
            note("nothing pending: migration tool not run")
            return
        result = self.run_migrations()
        self.db = replace(self.db, applied=cmd.count_applied(
            self.settings.database["migration_tool"], result.stdout + result.stderr))
        note(f"{self.db.applied} applied")

    def run_migrations(self) -> Result:
        st = self.settings
        try:
            result = self.s.primary.run(cmd.migrate_command(st, self.migrations_dir,
                                                            self.release.image),
                                        timeout=st.database["migration_timeout"] + 30,
                                        check=False)
        except CommandTimeoutError:
            result = None
        restore = (f"inv db.restore --env={st.env} "
                   f"--snapshot={os.path.basename(self.db.snapshot or '')}")
        hint = (f"Traffic is still on the old version. Snapshot taken before migrating: "
                f"{self.db.snapshot}\nTo restore it: {restore}")
        if result is None or result.exit_status in (124, 137):
            raise MigrationError(f"migrations timed out after "
                                 f"{st.database['migration_timeout']} s", hint=hint)
        if not result.ok:
            raise MigrationError(cmd.migration_failure(result.stdout, result.stderr,
                                                       result.exit_status, self.s.redact),
                                 hint=hint)
        return result

    def certificate(self, note: StepNote) -> None:
        """Step (proxy.tls): the certificate on every host before any switch, obtained from
        the ACME server once and kept; a refusal stops the deploy with the old version and
        the old certificate serving."""
        sites = self.on_hosts("certs", lambda host: certs.serve_challenges(self.settings, host))
        outcomes = self.on_hosts("certs", lambda host: certs.ensure(self.settings, host))
        note("; ".join(f"{name}: {certs.step_line(sites[name].value, outcome.value)}"
                       for name, outcome in outcomes.items()))

    def switch(self, note: StepNote) -> None:
        outcomes = self.switch_traffic()
        self.run_hook("post-switch", "switched")
        note(f"traffic on {self.slots.new} ({self.release.sha7}), verified through the proxy "
             f"({fleet.summary(outcomes)})")

    def waves(self, note: StepNote) -> None:
        """Step (deployment.rolling): start, health and switch wave by wave."""
        lines = self.roll_out()
        self.run_hook("post-switch", "switched")
        note(f"traffic on {self.slots.new} ({self.release.sha7}) in {len(lines)} waves, each "
             "verified through its hosts' proxies")

    def record(self, note: StepNote) -> None:
        deployment = self.deployment_record("healthy")
        limit = self.settings.deployment["history_limit"]
        self.state = self.s.store.update(lambda state: state.record_success(deployment, limit))
        note(f"{self.deployment_id} is current")

    def finish(self, note: StepNote) -> None:
        """Step: on every host at once, old images pruned while the old slot drains, then
        the old slot stopped."""
        pruned = cleanup.CleanupReport()

        def meanwhile(host: Host) -> None:
            cleanup.prune_host_after_deploy(self.s, self.state, host, pruned)
            certs.retire_after_switch(self.s, host)

        self.drain_and_stop_old_slot(meanwhile=meanwhile)
        cleanup.log_pruned(self.s, pruned)
        if not self.slots.old:
            note("first deployment: no old slot to stop")
            return
        note(f"{cmd.service(self.slots.old)} stopped (kept for rollback)")

    # --- helpers --------------------------------------------------------------------------

    def deployment_record(self, health_status: str) -> dict[str, Any]:
        record = new_deployment(deployment_id=self.deployment_id,
                                git_commit=self.release.commit,
                                deployed_by=self.s.operator.email, slot=self.slots.new,
                                image=self.release.image, at=utc_now())
        record.update(health_status=health_status, migrations_run=self.db.applied,
                      duration_seconds=self.elapsed())
        if self.db.snapshot:
            record["snapshot"] = self.db.snapshot
        if self.image_digest:
            record["image_digest"] = self.image_digest
        return record

    def on_failure(self, step: str, message: str) -> None:
        if not self.switched and self.owns_environment:
            record = self.deployment_record("unhealthy" if self.gate_failed else "unknown")
            record["message"] = f"failed at {step}: {message}"[:500]
            limit = self.settings.deployment["history_limit"]
            try:
                self.s.store.update(lambda state: state.record_failure(record, limit))
            except (TogatherError, OSError) as exc:
                self.s.console.warn(f"could not record the failed deployment: {exc}")
        done = ", ".join(self.progress.completed) or "nothing"
        where = "traffic was not switched: the old version keeps serving" if not self.switched \
            else f"traffic is on {self.slots.new} ({self.release.sha7})"
        self.s.console.note(f"deploy failed ({step}). Done before the failure: {done}; "
                            f"{where}.")
        self.s.audit(operation="deploy", deployment_id=self.deployment_id,
                     version=self.release.sha7, result="failed", step=step)

    def hook_values(self, status: str) -> dict[str, object]:
        """TOGATHER_* variables for hooks (never secrets)."""
        return {"operation": "deploy", "environment": self.settings.env,
                "version": self.release.sha7, "git_commit": self.release.commit,
                "deployment_id": self.deployment_id, "slot": self.slots.new,
                "previous_slot": self.slots.old, "status": status, "duration": self.elapsed()}

    def notify_fields(self) -> dict[str, object]:
        return {"deployment_id": self.deployment_id, "version": self.release.sha7,
                "git_commit": self.release.commit}

    def _log_path(self) -> str | None:
        return str(self.s.log.path) if self.s.log.path else None


Deploy.steps = (
    Step("validate", "configuration, git ref and hosts", Deploy.validate),
    Step("lock", "taking the environment lock", Deploy.acquire_lock),
    Step("build", "image on every host", Deploy.build),
    Step("snapshot", "database snapshot", Deploy.snapshot),
    Step("migrate", "database migrations", Deploy.migrate, destructive=True),
    Step("start", "starting the new slot", Deploy.start, undo=Deploy.stop_new_slot,
         when=lambda d: d.rolling_batch is None),
    Step("health", "health gate on the new slot", Deploy.health,
         when=lambda d: d.rolling_batch is None),
    # Only with proxy.tls; before any switch, in both modes (a rolling deploy's waves find the
    # certificate there).
    Step("certs", "HTTPS certificate on every host", Deploy.certificate,
         when=lambda d: d.settings.tls is not None),
    Step("switch", "nginx -> the new slot", Deploy.switch, undo=Deploy.switch_back,
         destructive=True, commit=True, when=lambda d: d.rolling_batch is None),
    Step("waves", "start, health and switch, wave by wave", Deploy.waves,
         undo=Deploy.undo_waves, destructive=True, commit=True,
         when=lambda d: d.rolling_batch is not None),
    Step("record", "deployment state", Deploy.record, destructive=True),
    Step("finish", "drain and stop the old slot", Deploy.finish),
)
