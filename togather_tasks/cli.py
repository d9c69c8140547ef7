"""The Invoke tasks. Thin on purpose: parse and check arguments, load settings, call the
pipeline or the store, and turn the package's typed errors into exit codes (errors.ExitCode)."""

from __future__ import annotations

import functools
import inspect
import json as jsonlib
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Collection, Context, Exit, Program, Task, task

from .errors import (
    ExitCode,
    HealthCheckError,
    HostKeyError,
    Interrupted,
    TogatherError,
    UsageError,
)
from .output import Console, RunLog
from .redact import MASK, Redactor, is_secret_key
from .signals import interruptible

if TYPE_CHECKING:
    from . import config as configmod
    from .hosts import UnknownHostKeyError
    from .lease import Lease
    from .session import Session

ENV_HELP = "environment, as named in config/deployment.yml (e.g. staging, production)"
LOCK_WAIT_HELP = ("seconds to wait for a lock held by someone else before giving up "
                  "(exit 3); default 0: give up at once")
HOSTS_HELP = "only these hosts of the environment (comma-separated names); default all"

# The only short flags, each with one meaning in every task (`-d` is Invoke's --debug and
# `-R` its --dry, so neither names a task option).
SHORT_FLAGS = {"env": "e", "yes": "y", "dry_run": "n", "json_": "j"}


class TogatherTask(Task):
    """A task with deliberate short flags only (Invoke's automatic ones gave `-r` to --ref in
    deploy and to --restore-db in rollback) and integer options typed as int in `--help` and
    in parsing, also those whose default None means "the configured value"."""

    def __init__(self, *args: Any, ints: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, auto_shortflags=False, **kwargs)
        self.ints = ints

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        if name in SHORT_FLAGS:
            opts["names"].append(SHORT_FLAGS[name])
        if name in self.ints:
            opts["kind"] = int
        return opts


def togather_task(*args: Any, **kwargs: Any) -> Any:
    """`@task` for this package's tasks (see TogatherTask)."""
    return task(*args, klass=TogatherTask, **kwargs)


def _invoke_dry(c: Context) -> bool:
    """Invoke's core -R/--dry (also INVOKE_RUN_DRY=1 or `run.dry` in an Invoke config file)."""
    return bool(c.config.run.dry)


def dry_under_invoke_dry(body: Callable[..., Any]) -> Callable[..., Any]:
    """For a task with a --dry-run of its own: Invoke's -R/--dry means that dry run. Ignored,
    `inv -R deploy` deployed for real while its operator believed nothing would run."""

    @functools.wraps(body)
    def honouring_dry(c: Context, *args: Any, **kwargs: Any) -> Any:
        if _invoke_dry(c):
            call = inspect.signature(body).bind(c, *args, **kwargs)
            call.arguments["dry_run"] = True
            return body(*call.args, **call.kwargs)
        return body(c, *args, **kwargs)

    return honouring_dry


def refused_under_invoke_dry(body: Callable[..., Any]) -> Callable[..., Any]:
    """For a task that changes something and has no dry run: under Invoke's -R/--dry it refuses
    (exit 2) before doing anything, rather than act while the operator expects a rehearsal."""
    # `exec_` is `exec` (a Python builtin otherwise), `lock_acquire` is `lock.acquire`.
    command = body.__name__.rstrip("_").replace("_", ".", 1)

    @functools.wraps(body)
    def refusing_dry(c: Context, *args: Any, **kwargs: Any) -> Any:
        if _invoke_dry(c):
            raise Exit(f"error: {command} has no dry run and -R/--dry does not rehearse it; "
                       "nothing was changed", code=int(ExitCode.INVALID_ARGUMENTS))
        return body(c, *args, **kwargs)

    return refusing_dry


def project_root(c: Context) -> Path:
    from . import config as configmod

    configured = _togather_config(c).get("root")
    return Path(configured) if configured else configmod.find_project_root(Path.cwd())


@contextmanager
def guarded(console: Console, log: RunLog | None = None) -> Iterator[None]:
    """Expected failures -> one clear message and the contract's exit code; anything else ->
    a short message, the traceback only in the run log (or with TOGATHER_DEBUG=1)."""
    try:
        with interruptible():
            yield
    except Exit:
        raise
    except TogatherError as exc:
        console.error(exc.message)
        if exc.hint:
            console.note(exc.hint)
        if log is not None and log.path:
            log.event("error", code=int(exc.exit_code), message=exc.message)
            print(f"run log: {log.path}", file=console.err, flush=True)
        raise Exit(code=int(exc.exit_code)) from None
    except Interrupted as exc:
        console.error(f"interrupted ({exc.signame}); stopped after cleaning up (a lock taken "
                      "by this run was released)")
        raise Exit(code=int(ExitCode.FAILURE)) from None
    except Exception as exc:  # noqa: BLE001 - last line of defence against tracebacks
        # Redacted as text, before any repr() escapes a secret out of its recognisable form.
        details = traceback.format_exc()
        if log is not None:
            log.event("internal_error", error=f"{type(exc).__name__}: {exc}", traceback=details)
        if console.debug_enabled:
            console.note(details)
        console.error(f"internal error: {type(exc).__name__}: {exc}"
                      + (f" (details in {log.path})" if log is not None and log.path else ""))
        raise Exit(code=int(ExitCode.FAILURE)) from None


def make_console(c: Context, *, quiet: bool = False) -> Console:
    """A console whose debug output is on with TOGATHER_DEBUG=1 or Invoke's -d/--debug."""
    console = Console(Redactor(), quiet=quiet)
    if _togather_config(c).get("debug"):
        console.debug_enabled = True
    return console


def _togather_config(c: Context) -> dict[str, Any]:
    return c.config.get("togather", {}) if hasattr(c, "config") else {}


def load(c: Context, env: str | None, *, require_secrets: bool = True) -> configmod.Settings:
    from . import config as configmod

    return configmod.load_settings(configmod.check_env_name(env), project_root(c),
                                   require_secrets=require_secrets)


# Commands that act on Compose slots or the nginx proxy of ours, which a swarm environment
# does not have: refused there (exit 2) before anything is touched, with what to do instead.
NOT_ON_SWARM = {
    "exec": "it runs a one-off Compose container or enters a slot; on a swarm use "
            "`docker exec` into a task on its node (`inv status` names the nodes)",
    "maintenance": "the maintenance page is served by the proxy of a Compose environment; on "
                   "a swarm put it in your load balancer",
    "cleanup": "it prunes Compose slot images and releases; on a swarm each deploy removes "
               "the service's unused secrets, and `docker image prune` on each node frees "
               "old images",
    "certs.show": "TLS ends at the proxy of a Compose environment; on a swarm it ends at "
                  "your load balancer",
    "certs.renew": "TLS ends at the proxy of a Compose environment; on a swarm it ends at "
                   "your load balancer",
}


def refuse_on_swarm(settings: configmod.Settings, operation: str) -> None:
    """UsageError (exit 2) for an `operation` of NOT_ON_SWARM on an `engine: swarm` env."""
    why = NOT_ON_SWARM.get(operation)
    if why and settings.engine == "swarm":
        shown = "maintenance.on/off" if operation == "maintenance" else operation
        raise UsageError(f"`inv {shown}` is not supported on {settings.env} "
                         f"(engine swarm): {why}. Nothing was changed.")


def run_command(c: Context, env: str | None, operation: str,
                body: Callable[[Session], Any], *, quiet: bool = False, log: bool = False,
                accept_new_host_key: bool = False) -> Any:
    from .session import Session

    console = make_console(c, quiet=quiet)
    with guarded(console):
        settings = load(c, env)
        refuse_on_swarm(settings, operation)
    console.redactor.add(settings.secret_values())
    run_log = RunLog.for_run(settings.env, operation, console.redactor) if log \
        else RunLog(None, console.redactor)
    session = Session(settings, console, run_log, accept_new_host_key=accept_new_host_key)
    try:
        with guarded(console, run_log):
            return body(session)
    finally:
        session.close()


def checked_lock_wait(seconds: int) -> int:
    # A day at most: a queue longer than that is a stuck pipeline, not a wait.
    if not 0 <= seconds <= 86400:
        raise UsageError("--lock-wait takes seconds from 0 to 86400")
    return seconds


def confirm(settings: configmod.Settings, yes: bool, what: str) -> None:
    """Production (any environment with `confirm: true`) asks first; CI (no terminal) must
    say --yes explicitly."""
    if not settings.confirm or yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{what} on production needs confirmation: pass --yes "
                         "(stdin is not a terminal)")
    answer = input(f"{what} on {settings.env.upper()} ({', '.join(settings.hosts)}). "
                   "Type 'yes' to go on: ")
    if answer.strip().lower() != "yes":
        raise UsageError("not confirmed; nothing was changed")


@togather_task(help={"env": ENV_HELP, "ref": "git ref to deploy (default HEAD)",
                     "dry_run": "validate and print the plan; change nothing anywhere",
                     "force": "break a lock held by someone else (prints the holder first)",
                     "skip_migrations": "no snapshot, no migrations",
                     "yes": "do not ask for confirmation (production)",
                     "lock_wait": LOCK_WAIT_HELP},
                ints=("lock_wait",))
@dry_under_invoke_dry
def deploy(c, env=None, ref="HEAD", dry_run=False, force=False, skip_migrations=False,
           yes=False, lock_wait=0):
    """Deploy a commit with zero downtime (build, snapshot, migrate, switch slots).

    Steps: validate, lock, build, snapshot, migrate, start the idle slot, health-gate it,
    switch nginx, record, stop the old slot.
    """

    from .deploy import Deploy, DeployOptions

    def body(session: Session) -> None:
        if not dry_run:
            confirm(session.settings, yes, "deploy")
        options = DeployOptions(ref=ref, dry_run=dry_run, force=force,
                                skip_migrations=skip_migrations,
                                lock_wait=checked_lock_wait(lock_wait))
        engine = Deploy
        if session.settings.engine == "swarm":
            from .swarm import SwarmDeploy as engine
        result = engine(session, options).run()
        console = session.console
        if dry_run:
            console.print("dry run: nothing was changed. The deploy would run:")
            for line in result.plan:
                console.print(f"  {line}")
            return
        d = result.deployment
        where = f"{d['active_slot']} slot"
        if session.settings.engine == "swarm":
            from .swarm import service_name
            where = f"service {service_name(session.settings)}"
        console.print(f"deployed {d['version']} to {session.settings.env} ({where}) as "
                      f"{d['id']} in {d['duration_seconds']}s")
        console.print(f"  url: {session.settings.public_url}")
        console.print(f"  log: {result.log_path}  (ssh connections: {result.ssh_connections})")

    run_command(c, env, "deploy", body, log=True)


@togather_task(help={"env": ENV_HELP, "json_": "machine-readable output", "hosts": HOSTS_HELP})
def status(c, env=None, json_=False, hosts=None):
    """Current and previous deployment, active slot, per host: where its proxy routes and
    what runs in each slot; lock holder."""

    def body(session: Session) -> None:
        from .fleet import on_each, raise_first_failure
        from .status import describe_hosts, host_status
        state = session.store.read().state
        if session.settings.engine == "swarm":
            from . import swarm
            swarm_doc = swarm.status_doc(session, state)
            if json_:
                session.console.always(jsonlib.dumps(swarm_doc, indent=2))
            else:
                swarm.print_status(session, swarm_doc, _describe_lock)
            return
        chosen = session.chosen_hosts(hosts)
        outcomes = on_each(chosen, lambda host: host_status(session.settings, host),
                           parallel=session.settings.deployment["parallel"], into={})
        raise_first_failure(outcomes)
        per_host = {name: outcome.value for name, outcome in outcomes.items()}
        doc = {"environment": session.settings.env, "active_slot": state.active_slot,
               "current_deployment": state.current, "previous_deployment": state.previous,
               "slots": next(iter(per_host.values()))["slots"], "hosts": per_host,
               "lock": state.lock}
        if json_:
            session.console.always(jsonlib.dumps(doc, indent=2))
            return
        p = session.console.print
        p(f"environment: {session.settings.env} ({', '.join(session.settings.hosts)})")
        p(f"current:     {_describe_deployment(state.current)}")
        p(f"previous:    {_describe_deployment(state.previous)}")
        p(f"active slot: {state.active_slot or '-'}")
        for line in describe_hosts(per_host):
            p(line)
        disagreement = {info["routes_to"] for info in per_host.values()} - {None}
        if len(disagreement) > 1:
            session.console.warn("the hosts' proxies route to different slots (a run was "
                                 "interrupted between two hosts' switches); the next deploy "
                                 "or rollback brings them back to one")
        p(f"lock:        {_describe_lock(state.lock)}")

    run_command(c, env, "status", body, quiet=json_)


@togather_task(help={"env": ENV_HELP, "limit": "how many entries (default 10)",
                     "json_": "machine-readable output"})
def history(c, env=None, limit=10, json_=False):
    """Deployment history, newest first (failed deployments included)."""

    def body(session: Session) -> None:
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        entries = session.store.read().state.known_deployments()[:limit]
        if json_:
            session.console.always(jsonlib.dumps(entries, indent=2))
            return
        if not entries:
            session.console.print("no deployments yet")
        for e in entries:
            session.console.print(
                f"{e['deployed_at']}  {e['version']}  {e['status']:<11} "
                f"{e.get('active_slot', '-'):<5}  {e['deployed_by']}  {e['id']}"
                + (f"  ({e['message']})" if e.get("message") else ""))

    run_command(c, env, "history", body, quiet=json_)


def _describe_deployment(d: dict | None) -> str:
    if not d:
        return "-"
    return (f"{d['version']} ({d['id']}) slot {d['active_slot']}, {d['health_status']}, "
            f"by {d['deployed_by']} at {d['deployed_at']}")


def _describe_lock(lock: dict, host_now: datetime | None = None) -> str:
    """`host_now`: the host's time read with the lock (its age and expiry are the host's)."""
    from .lock import describe
    from .state import utc_now

    return describe(lock, host_now or utc_now()) if lock.get("locked") else "free"


@togather_task(name="status", help={"env": ENV_HELP, "json_": "machine-readable output"})
def lock_status(c, env=None, json_=False):
    """Who holds the environment's lock, since when, until when."""

    def body(session: Session) -> None:
        snap = session.store.read()
        lock = snap.state.lock
        if json_:
            session.console.always(jsonlib.dumps(lock, indent=2))
        else:
            session.console.print(f"{session.settings.env}: "
                                  f"{_describe_lock(lock, snap.host_now)}")

    run_command(c, env, "lock", body, quiet=json_)


@togather_task(name="acquire",
               help={"env": ENV_HELP, "message": "why (shown to whoever is blocked)",
                     "lock_wait": LOCK_WAIT_HELP}, ints=("lock_wait",))
@refused_under_invoke_dry
def lock_acquire(c, env=None, message=None, lock_wait=0):
    """Hold the lock by hand (e.g. during maintenance) until `lock.release` or expiry."""

    def body(session: Session) -> None:
        from .lease import wait_for_lock
        from .ulid import new_id
        if not message:
            raise UsageError("--message is required: say why you hold the lock")
        lock, decision = wait_for_lock(
            lambda: session.store.acquire(
                session.operator, deployment_id=new_id("dep"), operation="manual",
                timeout_minutes=session.settings.deployment["lock_timeout_minutes"],
                message=message, with_pid=False),
            wait_seconds=checked_lock_wait(lock_wait), console=session.console)
        if decision.replaced:
            session.console.warn(f"took over a lock: {decision.reason}")
        session.console.print(f"{session.settings.env} locked: {lock['lock_id']} by "
                              f"{lock['locked_by']} until {lock['lock_expires_at']}")

    run_command(c, env, "lock", body)


@togather_task(name="release", help={
    "env": ENV_HELP, "force": "release a lock held by someone else (prints the holder)"})
@refused_under_invoke_dry
def lock_release(c, env=None, force=False):
    """Release the environment's lock (yours; anyone's with --force)."""

    def body(session: Session) -> None:
        from .errors import LockHeldError
        from .lock import is_mine
        env = session.settings.env
        outcome = session.store.release_where(
            lambda lock: force or is_mine(lock, session.operator))
        lock = outcome.found
        if not lock.get("locked"):
            session.console.print(f"{env}: lock already free")
            return
        holder = _describe_lock(lock, outcome.at)
        if not outcome.released:
            raise LockHeldError(
                f"{env} is locked by {holder}",
                hint="Only the holder releases it; break it with --force if you are sure the "
                     "holder is gone.")
        if force:
            session.console.warn(f"broke the lock of {holder}")
        session.audit(operation="lock.release", lock_id=lock.get("lock_id"), forced=force)
        session.console.print(f"{env}: lock released")

    run_command(c, env, "lock", body)


@togather_task(name="validate", help={"env": ENV_HELP})
def config_validate(c, env=None):
    """Validate config/deployment.yml and the environment's secrets file (no host contact)."""
    from . import config as configmod

    console = make_console(c)
    with guarded(console):
        settings = load(c, env)
        for warning in settings.warnings:
            console.warn(warning)
        console.print(f"{settings.env}: configuration is valid "
                      f"({settings.root / configmod.CONFIG_FILE}, {settings.env_file})")


@togather_task(name="show", help={"env": ENV_HELP, "json_": "machine-readable output"})
def config_show(c, env=None, json_=False):
    """The merged configuration of an environment, every secret redacted."""
    from . import config as configmod

    console = make_console(c)
    with guarded(console):
        settings = load(c, env)
        redactor = settings.redactor()
        doc = settings.public_dict()
        doc["secrets"] = {k: (v if k in configmod.NON_SECRET_KEYS else MASK if is_secret_key(k)
                              else redactor(v))
                          for k, v in sorted(settings.secrets.items())}
        text = jsonlib.dumps(doc, indent=2, default=str)
        console.redactor = redactor
        console.always(text if json_ else _yamlish(text))


def _yamlish(text: str) -> str:
    import yaml
    return yaml.safe_dump(jsonlib.loads(text), sort_keys=False).rstrip()


@togather_task(name="trust", help={
    "env": ENV_HELP, "yes": "accept every unknown key without asking (after printing it)",
    "fingerprint": "accept only keys with this SHA256:... fingerprint (comma-separated for "
                   "several hosts or ProxyJump hops); for scripts"})
@refused_under_invoke_dry
def hosts_trust(c, env=None, yes=False, fingerprint=None):
    """Show the SHA256 fingerprint of each unknown host key, then record it once accepted
    (typed `yes`, --yes, or a matching --fingerprint). Changed and revoked keys are refused."""
    expected = {f.strip() for f in (fingerprint or "").split(",") if f.strip()}
    if any(not f.startswith("SHA256:") for f in expected):
        raise Exit("error: --fingerprint takes SHA256:... values (as ssh-keygen -lf prints "
                   "them)", code=int(ExitCode.INVALID_ARGUMENTS))

    def body(session: Session) -> None:
        from .hosts import UnknownHostKeyError
        for host in session.all_hosts:
            for _ in range(MAX_TRUST_HOPS):
                try:
                    host.run("true", timeout=30)
                    break
                except UnknownHostKeyError as unknown:
                    session.console.print(f"{unknown.hostname}: {unknown.key.get_name()} "
                                          f"{unknown.fingerprint}")
                    _accept_host_key(unknown, expected, yes)
                    unknown.record()
                    session.console.print(f"{unknown.hostname}: host key trusted")
            else:
                raise HostKeyError(f"{host.name}: more than {MAX_TRUST_HOPS} unknown host "
                                   "keys on the way; check its ProxyJump chain")
            session.console.print(f"{host.name}: host keys known")

    run_command(c, env, "hosts", body)


@togather_task(name="setup", help={
    "env": ENV_HELP, "dry_run": "probe every item and print the commands it would run; change "
                               "nothing",
    "yes": "do not ask for confirmation (production)"})
@dry_under_invoke_dry
def hosts_setup(c, env=None, dry_run=False, yes=False):
    """Prepare fresh Debian/Ubuntu hosts (as root or with sudo -n): Docker, the Compose v2
    plugin, the deploy user in the docker group, the remote directory (0750), and on the first
    host pg_dump/psql and the migration tool. Idempotent: only what is missing is done."""

    def body(session: Session) -> None:
        from .hostsetup import setup_hosts
        if not dry_run:
            confirm(session.settings, yes, "hosts.setup")
        setup_hosts(session, dry_run=dry_run)

    run_command(c, env, "hosts", body)


# A host behind a chain of ProxyJump gateways: one unknown key per hop.
MAX_TRUST_HOPS = 8


def _accept_host_key(unknown: UnknownHostKeyError, expected: set[str], yes: bool) -> None:
    """--fingerprint decides alone when given; otherwise --yes, or `yes` typed at a terminal
    after the fingerprint was shown."""
    if expected:
        if unknown.fingerprint not in expected:
            raise HostKeyError(f"host key of {unknown.hostname} is {unknown.fingerprint}, not "
                               f"the expected {', '.join(sorted(expected))}: refused, nothing "
                               "recorded")
        return
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("hosts.trust needs --yes or --fingerprint=SHA256:... when stdin is "
                         "not a terminal")
    answer = input(f"Trust this key for {unknown.hostname}? Type 'yes': ")
    if answer.strip().lower() != "yes":
        raise UsageError("not confirmed; nothing recorded")


@togather_task(help={
    "env": ENV_HELP, "to": "version (short/full SHA) or deployment id from the history",
    "dry_run": "show the target and the plan; change nothing",
    "yes": "do not ask for confirmation (production, --restore-db)",
    "restore_db": "also restore the snapshot taken before the rolled-back deployment",
    "lock_wait": LOCK_WAIT_HELP}, ints=("lock_wait",))
@dry_under_invoke_dry
def rollback(c, env=None, to=None, dry_run=False, yes=False, restore_db=False, lock_wait=0):
    """Return traffic to the previous deployment (or --to one from the history)."""
    from .rollback import Rollback, RollbackOptions

    def body(session: Session) -> None:
        if not dry_run:
            confirm(session.settings, yes, "rollback")
        engine = Rollback
        if session.settings.engine == "swarm":
            from .swarm import SwarmRollback as engine
        rb = engine(session, RollbackOptions(to=to, dry_run=dry_run, restore_db=restore_db,
                                               yes=yes, lock_wait=checked_lock_wait(lock_wait)))
        target = rb.run()
        if dry_run:
            session.console.print(f"dry run: would roll back to {target['version']} "
                                  f"({target['id']}); nothing was changed:")
            for line in rb.plan():
                session.console.print(f"  {line}")

    run_command(c, env, "rollback", body, log=True)


@togather_task(help={"env": ENV_HELP, "slot": "active (through the proxy, default), blue or green",
                     "expected_version": "fail unless this version (SHA) is running",
                     "json_": "machine-readable output", "hosts": HOSTS_HELP})
def health(c, env=None, slot="active", expected_version=None, json_=False, hosts=None):
    """Check the app's /health (through the proxy or one slot) against the contract; on a
    fleet (or with --hosts) each host too, through its own proxy or slot."""
    from .health import judge, unreachable

    def body(session: Session) -> None:
        from .fleet import on_each, raise_first_failure
        from .status import HostHealth, host_health
        st = session.settings
        if slot not in ("active", "blue", "green"):
            raise UsageError(f"--slot must be active, blue or green, not {slot!r}")
        per_host = {}
        if st.engine == "swarm":
            from .swarm import task_health
            if slot != "active" or hosts:
                raise UsageError("--slot and --hosts do not apply to engine swarm: every task "
                                 "is checked")
            per_host = {f"{t.host} task {t.task}": HostHealth(
                f"{t.host}:{st.ports['proxy']}{st.health_endpoint}", t.verdict, t.latency_ms)
                for t in task_health(session, expected_version)}
        elif hosts or len(st.hosts) > 1 or slot != "active":
            outcomes = on_each(session.chosen_hosts(hosts), lambda host: host_health(
                st, host, slot, expected_version), parallel=st.deployment["parallel"], into={})
            raise_first_failure(outcomes)
            per_host = {name: outcome.value for name, outcome in outcomes.items()}
        if slot == "active":
            import requests
            where = st.public_url.rstrip("/") + st.health_endpoint
            timeout = float(st.health.timeout)

            def fetch(path: str) -> tuple[int, bytes]:
                resp = requests.get(st.public_url.rstrip("/") + path, timeout=timeout)
                return resp.status_code, resp.content

            start = time.monotonic()
            try:
                verdict = judge(fetch, mode=st.health_mode, health_endpoint=st.health_endpoint,
                                version_endpoint=st.version_endpoint,
                                expected_version=expected_version)
            except requests.RequestException as exc:
                verdict = unreachable(f"no answer from {where}: {type(exc).__name__}")
            elapsed_ms = int((time.monotonic() - start) * 1000)
        else:
            first = next(iter(per_host.values()))
            where, verdict, elapsed_ms = first.where, first.verdict, first.latency_ms
        require = st.deployment["require_healthy"]
        problems = [f"{name}: {h.verdict.summary()}" for name, h in per_host.items()
                    if not h.verdict.acceptable(require_healthy=require)]
        if slot == "active" and not verdict.acceptable(require_healthy=require):
            problems.insert(0, verdict.summary())
        https = _https_health(session, hosts) if st.tls and slot == "active" else {}
        problems += [f"{name}: HTTPS: {h.problem}" for name, h in https.items() if h.problem]
        ok = not problems
        if json_:
            doc = {"environment": st.env, "url": where, "status": verdict.status,
                   "http_status": verdict.http_status, "ok": ok, "problem": verdict.problem,
                   "version": verdict.version, "latency_ms": elapsed_ms,
                   "checks": verdict.checks}
            if len(per_host) > 1 or hosts:
                doc["hosts"] = {name: h.as_dict(require) for name, h in per_host.items()}
            if https:
                doc["https"] = {name: h.doc for name, h in https.items()}
            session.console.always(jsonlib.dumps(doc, indent=2))
        else:
            _print_health(session.console, where, verdict, elapsed_ms)
            if len(per_host) > 1 or (hosts and slot == "active"):
                for name, h in per_host.items():
                    session.console.print(h.line(name))
            for h in https.values():
                session.console.print(h.line)
        for h in https.values():
            if h.warning:
                session.console.warn(h.warning)
            if ok and verdict.status == "degraded":
                session.console.warn("degraded: the app runs but reports a warning")
        if problems:
            raise HealthCheckError(f"{st.env} is not healthy: {'; '.join(problems)}")

    run_command(c, env, "health", body, quiet=json_)


def _https_health(session: Session, hosts: str | None) -> dict[str, Any]:
    """proxy.tls: the health endpoint over HTTPS through each host's proxy and the
    certificate it presents (certs.https_health)."""
    from .certs import https_health
    from .fleet import on_each, raise_first_failure
    st = session.settings
    outcomes = on_each(session.chosen_hosts(hosts), lambda host: https_health(st, host),
                       parallel=st.deployment["parallel"], into={})
    raise_first_failure(outcomes)
    return {name: outcome.value for name, outcome in outcomes.items()}


def _print_health(console: Console, where: str, verdict, elapsed_ms: int) -> None:
    version = f", version {verdict.version}" if verdict.version else ""
    http = f"HTTP {verdict.http_status}, " if verdict.http_status else ""
    console.print(f"{where}: {verdict.status} ({http}{elapsed_ms} ms){version}")
    if verdict.problem:
        console.print(f"  {verdict.problem}")
    if verdict.checks:
        console.print(f"  {'CHECK':<16} {'STATUS':<6} {'LATENCY':>8}  MESSAGE")
        for name, check in verdict.checks.items():
            console.print(f"  {name:<16} {check.get('status', '?'):<6} "
                          f"{check.get('latency', '-'):>8}  {check.get('message', '')}")


@contextmanager
def _held(session: Session, operation: str) -> Iterator[Lease]:
    """The environment's lock around a maintenance command. Exclusive, like a deploy's: what
    cleanup and db.snapshot remove (an image, a snapshot) is judged against the state, and an
    in-flight deploy's fresh image or pre-migration snapshot is not in the state yet."""
    from .lease import Lease
    from .ulid import new_id
    with Lease(session, deployment_id=new_id("dep"), operation=operation) as lease:
        replaced = lease.decision.replaced if lease.decision else None
        if replaced:
            session.console.warn(f"took over the lock of {_describe_lock(replaced)}: "
                                 f"{lease.decision.reason}")
        yield lease


@togather_task(name="snapshot", help={"env": ENV_HELP})
@refused_under_invoke_dry
def db_snapshot(c, env=None):
    """Take a database snapshot now (pg_dump on the primary host, verified)."""

    def body(session: Session) -> None:
        from .dbops import snapshot_now
        with _held(session, "db.snapshot"):
            path, size = snapshot_now(session)
        session.console.print(f"snapshot {path} ({size // 1024} KiB, verified)")

    run_command(c, env, "db", body)


@togather_task(name="snapshots", help={"env": ENV_HELP, "json_": "machine-readable output"})
def db_snapshots(c, env=None, json_=False):
    """List the database snapshots on the primary host, newest first."""

    def body(session: Session) -> None:
        from .snapshots import list_snapshots, protected_names
        state = session.store.read().state
        protected = protected_names(state)
        items = [{"name": s.name, "taken_at": s.taken_at.isoformat(), "version": s.sha7,
                  "bytes": s.size, "protected": s.name in protected}
                 for s in list_snapshots(session)]
        if json_:
            session.console.always(jsonlib.dumps(items, indent=2))
            return
        if not items:
            session.console.print("no snapshots")
        for item in items:
            mark = "  (current deployment)" if item["protected"] else ""
            session.console.print(f"{item['name']}  {item['bytes'] // 1024:>8} KiB{mark}")

    run_command(c, env, "db", body, quiet=json_)


@togather_task(name="restore",
               help={"env": ENV_HELP, "snapshot": "snapshot name (see db.snapshots)",
                     "yes": "do not ask for confirmation"})
@refused_under_invoke_dry
def db_restore(c, env=None, snapshot=None, yes=False):
    """Restore a snapshot into the environment's database (a safety snapshot is taken first)."""

    def body(session: Session) -> None:
        from .dbops import check_snapshot_name, confirm_restore, restore
        if not snapshot:
            raise UsageError("--snapshot=NAME is required (see `inv db.snapshots`)")
        check_snapshot_name(session.settings.env, snapshot)
        confirm(session.settings, yes, "restore")
        confirm_restore(session.settings.env, snapshot, yes)
        safety = restore(session, snapshot)
        session.console.print(f"restored {snapshot}; the data as it was is in {safety}")

    run_command(c, env, "db", body, log=True)


@togather_task(help={"env": ENV_HELP,
                     "keep_images": "images to keep per host (default from config)",
                     "keep_snapshots": "snapshots to keep (default from config)",
                     "dry_run": "show what would be removed"},
               ints=("keep_images", "keep_snapshots"))
@dry_under_invoke_dry
def cleanup(c, env=None, keep_images=None, keep_snapshots=None, dry_run=False):
    """Remove old images, releases and snapshots (never the current or previous ones)."""

    def body(session: Session) -> None:
        from .cleanup import run_cleanup
        st = session.settings
        # Invoke has parsed them as INT already; None means "as configured".
        ki = keep_images if keep_images is not None else st.deployment["keep_images"]
        ks = keep_snapshots if keep_snapshots is not None else st.database["snapshot_keep"]
        if ki < 2 or ks < 1:
            raise UsageError("--keep-images must be >= 2 and --keep-snapshots >= 1")
        with nullcontext() if dry_run else _held(session, "cleanup"):
            report = run_cleanup(session, keep_images=ki, keep_snapshots=ks, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        for host, refs in report.images.items():
            session.console.print(f"{host}: {verb} images: {', '.join(refs) or 'none'}")
            if report.kept_in_use.get(host):
                session.console.print(f"{host}: kept (used by a container): "
                                      f"{', '.join(report.kept_in_use[host])}")
            session.console.print(f"{host}: {verb} releases: "
                                  f"{', '.join(report.releases.get(host, [])) or 'none'}")
        session.console.print(f"{verb} snapshots: {', '.join(report.snapshots) or 'none'}")

    run_command(c, env, "cleanup", body)


@togather_task(help={
    "env": ENV_HELP, "follow": "keep streaming new lines until Ctrl-C",
    "lines": "lines per host to show first (default 100)",
    "since": "only lines newer than this, e.g. 30s, 10m, 2h, 1d",
    "grep": "only lines containing this text (case-sensitive)",
    "slot": "active (default), blue, green or proxy",
    "hosts": "comma-separated hosts of the environment (default: all)"})
def logs(c, env=None, follow=False, lines=100, since=None, grep=None, slot="active",
         hosts=None):
    """The app's container logs from every host, secrets masked.

    Each line is prefixed with its host when there are several. --follow streams until
    Ctrl-C, which ends it with exit 0.
    """
    from .logs import LogRequest, check_request, show_logs

    def body(session: Session) -> None:
        request = LogRequest(slot=slot, lines=lines, since=since, grep=grep, follow=follow,
                             hosts=hosts)
        check_request(request)
        if session.settings.engine == "swarm":
            from . import swarm
            if slot != "active" or hosts:
                raise UsageError("--slot and --hosts do not apply to engine swarm: `docker "
                                 "service logs` shows every task")
            swarm.show_logs(session, request)
            return
        show_logs(session, request)

    run_command(c, env, "logs", body)


@togather_task(name="exec", help={
    "env": ENV_HELP, "command": "the shell command to run (in sh -c)",
    "interactive": "attach a terminal (a console); output is not filtered then",
    "slot": "new: a one-off container of the current image (default); active: inside the "
            "running active slot",
    "yes": "do not ask for confirmation (production)"})
@refused_under_invoke_dry
def exec_(c, env=None, command=None, interactive=False, slot="new", yes=False):
    """Run a command with the app's image and environment (exit status: the command's).

    On the primary host, in a one-off container of the current image by default, or inside
    the running active slot with --slot=active.
    """
    from .execute import check_exec, run_in_app

    def body(session: Session) -> int:
        wanted = check_exec(command, slot)
        confirm(session.settings, yes, "exec")
        return run_in_app(session, wanted, slot=slot, interactive=interactive)

    status = run_command(c, env, "exec", body)
    if status:
        raise Exit(code=status)


@togather_task(help={"env": ENV_HELP, "lines": "how many records, newest last (default 50)",
                     "json_": "machine-readable output"})
def audit(c, env=None, lines=50, json_=False):
    """The primary host's audit log: deploys, rollbacks, restores, lock breaks."""
    from .audit import format_record, read_audit

    def body(session: Session) -> None:
        records = read_audit(session, lines)
        if json_:
            session.console.always(jsonlib.dumps(records, indent=2))
            return
        if not records:
            session.console.print("no audit records yet")
        for record in records:
            session.console.print(format_record(record))

    run_command(c, env, "audit", body, quiet=json_)


@togather_task(help={"json_": "machine-readable output"})
def version(c, json_=False):
    """This package's version, with Invoke's and Fabric's (`inv --version` is Invoke's)."""
    from importlib.metadata import version as installed
    from platform import python_version

    from . import __version__
    versions = {"togather_tasks": __version__, "invoke": installed("invoke"),
                "fabric": installed("fabric"), "python": python_version()}
    console = make_console(c)
    if json_:
        console.always(jsonlib.dumps(versions, indent=2))
        return
    console.print(f"togather-tasks {versions['togather_tasks']} (invoke {versions['invoke']}, "
                  f"fabric {versions['fabric']}, python {versions['python']})")


@togather_task(help={"path": "the application repository (default: the current directory)"})
@refused_under_invoke_dry
def init(c, path=None):
    """Start adopting the tool: write config/deployment.yml, .env.<env>.example files, sample
    hooks, tasks.py and the .gitignore lines. Never overwrites a file (says which it kept)."""
    from .scaffold import init as scaffold

    console = make_console(c)
    with guarded(console):
        root = Path(path or Path.cwd()).resolve()
        if not root.is_dir():
            raise UsageError(f"--path {root} is not a directory")
        report = scaffold(root)
        for relative in report.written:
            console.print(f"wrote {relative}")
        for relative in report.kept:
            console.print(f"kept  {relative} (it exists; not overwritten)")
        if report.gitignore_added:
            console.print(f"added to .gitignore: {', '.join(report.gitignore_added)}")
        console.print("next: fill in the hosts in config/deployment.yml, copy each "
                      ".env.<env>.example to .env.<env> (chmod 600) with real values, then "
                      "`inv config.validate --env=staging` and `inv hosts.setup --env=staging`")


def _parse_error_text(text: str) -> str:
    """Invoke's parser messages in the words of a command line."""
    needs = re.match(r"Flag <Argument: ([\w-]+)[^>]*> needed value", text)
    if needs:
        return f"--{needs[1].replace('_', '-').strip('-')} needs a value"
    unknown = re.match(r"No idea what '(.*)' is!", text)
    if unknown:
        return f"unknown option or task {unknown[1]!r}"
    return text


def _not_a_number_text(exc: ValueError, argv: list[str]) -> str | None:
    """Invoke lets int()'s ValueError escape from an INT option; say which option, in the
    operator's words (None when the error is not that)."""
    bad = re.fullmatch(r"invalid literal for int\(\) with base 10: '(.*)'", str(exc))
    if bad is None:
        return None
    for before, token in zip(["", *argv], argv, strict=False):
        flag, sign, value = token.partition("=")
        if sign and value == bad[1]:
            return f"{flag} takes a whole number, not {bad[1]!r}"
        if not sign and token == bad[1] and before.startswith("-"):
            return f"{before} takes a whole number, not {bad[1]!r}"
    return f"{bad[1]!r} is not a whole number"


def _argument_errors_exit_2() -> None:
    """Invoke exits 1 on a command-line parse error (an unknown flag, a flag without its
    value) and ends in a traceback for a non-number given to an INT option; the exit-code
    contract says 2 for invalid arguments. Patch the parse step of Invoke's Program once, in
    the process that loads these tasks."""
    from invoke.exceptions import ParseError

    original = Program.parse_tasks
    if getattr(original, "togather_patched", False):
        return

    def parse_tasks(self: Program) -> None:
        if "-d" in self.core.unparsed:
            # After a task name Invoke reads -d as its own --debug. Before 0.2 it meant
            # --dry-run here: an operator's old habit must never turn into a real deploy.
            raise _invalid_arguments("-d after a task name is ambiguous (it used to mean "
                                     "--dry-run): write -n/--dry-run for a dry run, or "
                                     "`inv -d TASK` / --debug for debug output")
        try:
            original(self)
        except ParseError as exc:
            raise _invalid_arguments(_parse_error_text(str(exc))) from None
        except ValueError as exc:
            text = _not_a_number_text(exc, self.core.unparsed)
            if text is None:
                raise
            raise _invalid_arguments(text) from None

    parse_tasks.togather_patched = True  # type: ignore[attr-defined]
    Program.parse_tasks = parse_tasks  # type: ignore[method-assign]


def _invalid_arguments(text: str) -> Exit:
    return Exit(f"error: {text} (see `inv --help TASK`)", code=int(ExitCode.INVALID_ARGUMENTS))


def _debug_flag_reaches_tasks() -> None:
    """Invoke's -d/--debug turns on Invoke's own logging only; a task never sees it. Record
    it as `togather.debug` in the config (a modification, so it outlives the collection's
    configuration merged later) so that `inv -d deploy` shows this tool's debug output too."""
    original = Program.update_config
    if getattr(original, "togather_patched", False):
        return

    def update_config(self: Program, merge: bool = True) -> None:
        original(self, merge=merge)
        if self.args.debug.value:
            self.config["togather"] = {"debug": True}

    update_config.togather_patched = True  # type: ignore[attr-defined]
    Program.update_config = update_config  # type: ignore[method-assign]


@togather_task(name="show", help={"env": ENV_HELP, "json_": "machine-readable output",
                                 "hosts": HOSTS_HELP})
def certs_show(c, env=None, json_=False, hosts=None):
    """The HTTPS certificate each host serves (proxy.tls): domains, issuer, expiry, and
    whether it verifies. Read-only."""

    def body(session: Session) -> None:
        from .certs import host_certificate
        from .fleet import on_each, raise_first_failure
        st = session.settings
        outcomes = on_each(session.chosen_hosts(hosts), lambda host: host_certificate(st, host),
                           parallel=st.deployment["parallel"], into={})
        raise_first_failure(outcomes)
        per_host = {name: outcome.value for name, outcome in outcomes.items()}
        if json_:
            session.console.always(jsonlib.dumps({"environment": st.env, "hosts": per_host},
                                                 indent=2))
            return
        for name, info in per_host.items():
            session.console.print(f"{name}: {info['summary']}")

    run_command(c, env, "certs.show", body, quiet=json_)


@togather_task(name="renew", help={"env": ENV_HELP, "force": "renew now, whatever the expiry",
                                  "hosts": HOSTS_HELP})
@refused_under_invoke_dry
def certs_renew(c, env=None, force=False, hosts=None):
    """Renew the ACME certificate on each host now when it is due (--force: in any case) and
    report the new expiry. The proxy picks it up at the next handshake: no reload."""

    def body(session: Session) -> None:
        from .certs import describe, renew
        from .fleet import on_each, raise_first_failure
        st = session.settings
        outcomes = on_each(session.chosen_hosts(hosts), lambda host: renew(st, host, force=force),
                           parallel=st.deployment["parallel"], into={})
        raise_first_failure(outcomes)
        for name, outcome in outcomes.items():
            how, info = outcome.value
            session.console.print(f"{name}: {how}: {describe(info)}")

    run_command(c, env, "certs.renew", body, log=True)


@togather_task(name="on", help={
    "env": ENV_HELP,
    "message": "the text the page shows (plain text; default: a short notice)",
    "retry_after": "seconds for the Retry-After header (default 300)"},
    ints=("retry_after",))
@refused_under_invoke_dry
def maintenance_on(c, env=None, message=None, retry_after=None):
    """Maintenance mode on every host: the proxy answers 503 with the page (no reload).

    Deploys and rollbacks keep it on; `inv maintenance.off` ends it. No lock: it touches no
    file a deploy touches, so it can go up in front of a deploy that is running."""

    def body(session: Session) -> None:
        from .fleet import on_each, raise_first_failure
        from .maintenance import notice, turn_on
        n = notice(message, retry_after, session.operator.email)
        outcomes = on_each(session.all_hosts, lambda host: turn_on(session.settings, host, n),
                           parallel=session.settings.deployment["parallel"], into={},
                           fail_fast=False)
        for outcome in outcomes.values():
            session.console.note(f"  {outcome.line()}"
                                 + (f": {outcome.error}" if outcome.error else ""))
        session.audit(operation="maintenance.on", retry_after=n.retry_after,
                      hosts=[name for name, o in outcomes.items() if o.ok])
        raise_first_failure(outcomes)
        session.console.print(f"maintenance mode is on for {session.settings.env}: HTTP 503, "
                              f"Retry-After {n.retry_after}s")

    run_command(c, env, "maintenance", body, log=True)


@togather_task(name="off", help={"env": ENV_HELP})
@refused_under_invoke_dry
def maintenance_off(c, env=None):
    """Maintenance mode off on every host: traffic flows again from the next request."""

    def body(session: Session) -> None:
        from .fleet import on_each, raise_first_failure
        from .maintenance import turn_off
        outcomes = on_each(session.all_hosts, lambda host: turn_off(session.settings, host),
                           parallel=session.settings.deployment["parallel"], into={},
                           fail_fast=False)
        for outcome in outcomes.values():
            session.console.note(f"  {outcome.line()}"
                                 + (f": {outcome.error}" if outcome.error else ""))
        session.audit(operation="maintenance.off",
                      hosts=[name for name, o in outcomes.items() if o.ok])
        raise_first_failure(outcomes)
        was_on = any(o.value for o in outcomes.values())
        session.console.print(f"maintenance mode is off for {session.settings.env}"
                              + ("" if was_on else " (it was not on)"))

    run_command(c, env, "maintenance", body, log=True)


NAMESPACES = (
    ("certs", "HTTPS certificates (proxy.tls): what each host serves; renew now.",
     (certs_show, certs_renew)),
    ("config", "Check and show an environment's configuration (no host contact).",
     (config_validate, config_show)),
    ("db", "Database snapshots: take, list, restore.", (db_snapshot, db_snapshots, db_restore)),
    ("hosts", "Prepare an environment's hosts; trust their SSH host keys.",
     (hosts_setup, hosts_trust)),
    ("lock", "The environment's deploy lock: who holds it; take or release it by hand.",
     (lock_status, lock_acquire, lock_release)),
    ("maintenance", "Maintenance mode: every host's proxy answers 503 with a page.",
     (maintenance_on, maintenance_off)),
)


def namespace(root: str | Path | None = None) -> Collection:
    """The task collection for an application repository's tasks.py:

        from togather_tasks import namespace
        ns = namespace(__file__)
    """
    _argument_errors_exit_2()
    _debug_flag_reaches_tasks()
    ns = Collection(deploy, rollback, health, status, history, cleanup, logs, exec_, audit,
                    version, init)
    for name, help_text, tasks in NAMESPACES:
        sub = Collection(name, *tasks)
        sub.__doc__ = help_text
        ns.add_collection(sub)
    if root is not None:
        path = Path(root).resolve()
        ns.configure({"togather": {"root": str(path.parent if path.is_file() else path)}})
    return ns


def main() -> None:
    """The `togather` command: these tasks without a tasks.py, for a repository that has none
    yet (`togather init`); afterwards `inv` finds them through the tasks.py init wrote."""
    from . import __version__

    Program(namespace=namespace(), version=__version__, name="togather",
            binary="togather").run()
