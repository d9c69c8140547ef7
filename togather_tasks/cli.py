"""The Invoke tasks. Thin on purpose: parse and check arguments, load settings, call the
pipeline or the store, and turn the package's typed errors into exit codes (errors.ExitCode)."""

from __future__ import annotations

import json as jsonlib
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from invoke import Collection, Context, Exit, task

from . import config as configmod
from .errors import ExitCode, Interrupted, TogatherError, UsageError
from .lock import describe
from .output import Console, RunLog
from .pipeline import Deploy, DeployOptions
from .redact import MASK, Redactor, is_secret_key
from .session import Session
from .signals import interruptible
from .state import utc_now

ENV_HELP = "environment: development, staging or production"


def project_root(c: Context) -> Path:
    configured = c.config.get("togather", {}).get("root") if hasattr(c, "config") else None
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
            print(console.redactor(exc.hint), file=console.err, flush=True)
        if log is not None and log.path:
            log.event("error", code=int(exc.exit_code), message=exc.message)
            print(f"run log: {log.path}", file=console.err, flush=True)
        raise Exit(code=int(exc.exit_code)) from None
    except Interrupted as exc:
        console.error(f"interrupted ({exc.signame}); cleaned up and released the lock")
        raise Exit(code=int(ExitCode.FAILURE)) from None
    except Exception as exc:  # noqa: BLE001 - last line of defence against tracebacks
        if log is not None:
            log.event("internal_error", error=repr(exc), traceback=traceback.format_exc())
        if console.debug_enabled:
            traceback.print_exc()
        console.error(f"internal error: {type(exc).__name__}: {exc}"
                      + (f" (details in {log.path})" if log is not None and log.path else ""))
        raise Exit(code=int(ExitCode.FAILURE)) from None


def load(c: Context, env: str | None, *, require_secrets: bool = True) -> configmod.Settings:
    return configmod.load_settings(configmod.check_env_name(env), project_root(c),
                                   require_secrets=require_secrets)


def run_command(c: Context, env: str | None, operation: str,
                body: Callable[[Session], Any], *, quiet: bool = False, log: bool = False,
                accept_new_host_key: bool = False) -> Any:
    console = Console(Redactor(), quiet=quiet)
    run_log: RunLog | None = None
    with guarded(console):
        settings = load(c, env)
    console.redactor.add(settings.secret_values())
    run_log = RunLog.for_run(settings.env, operation, console.redactor) if log \
        else RunLog(None, console.redactor)
    session = Session(settings, console, run_log, accept_new_host_key=accept_new_host_key)
    try:
        with guarded(console, run_log):
            return body(session)
    finally:
        session.close()


def confirm(settings: configmod.Settings, yes: bool, what: str) -> None:
    """Production asks first; CI (no terminal) must say --yes explicitly."""
    if settings.env != "production" or yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{what} on production needs confirmation: pass --yes "
                         "(stdin is not a terminal)")
    answer = input(f"{what} on PRODUCTION ({', '.join(settings.hosts)}). Type 'yes' to go on: ")
    if answer.strip().lower() != "yes":
        raise UsageError("not confirmed; nothing was changed")


@task(help={"env": ENV_HELP, "ref": "git ref to deploy (default HEAD)",
            "dry_run": "validate and print the plan; change nothing anywhere",
            "force": "break a lock held by someone else (prints the holder first)",
            "skip_migrations": "no snapshot, no migrations",
            "yes": "do not ask for confirmation (production)"})
def deploy(c, env=None, ref="HEAD", dry_run=False, force=False, skip_migrations=False,
           yes=False):
    """Deploy a commit with zero downtime (build, snapshot, migrate, switch slots).

    Steps: validate, lock, build, snapshot, migrate, start the idle slot, health-gate it,
    switch nginx, record, stop the old slot.
    """

    def body(session: Session) -> None:
        if not dry_run:
            confirm(session.settings, yes, "deploy")
        options = DeployOptions(ref=ref, dry_run=dry_run, force=force,
                                skip_migrations=skip_migrations)
        result = Deploy(session, options).run()
        console = session.console
        if dry_run:
            console.print("dry run: nothing was changed. The deploy would run:")
            for line in result.plan:
                console.print(f"  {line}")
            return
        d = result.deployment
        console.print(f"deployed {d['version']} to {session.settings.env} "
                      f"({d['active_slot']} slot) as {d['id']} in {d['duration_seconds']}s")
        console.print(f"  url: {session.settings.public_url}")
        console.print(f"  log: {result.log_path}  (ssh connections: {result.ssh_connections})")

    run_command(c, env, "deploy", body, log=True)


@task(help={"env": ENV_HELP, "json_": "machine-readable output"})
def status(c, env=None, json_=False):
    """Current and previous deployment, active slot, what runs in each slot, lock holder."""

    def body(session: Session) -> None:
        from .slots import read_slot_images, slot_container_state
        state = session.store.read().state
        slots = {}
        for slot in ("blue", "green"):
            slots[slot] = {"image": read_slot_images(session.settings, session.primary)
                           .get(slot), "container": slot_container_state(
                               session.settings, session.primary, slot).split(" ")[0]}
        doc = {"environment": session.settings.env, "active_slot": state.active_slot,
               "current_deployment": state.current, "previous_deployment": state.previous,
               "slots": slots, "lock": state.lock}
        if json_:
            session.console.always(jsonlib.dumps(doc, indent=2))
            return
        p = session.console.print
        p(f"environment: {session.settings.env} ({', '.join(session.settings.hosts)})")
        p(f"current:     {_describe_deployment(state.current)}")
        p(f"previous:    {_describe_deployment(state.previous)}")
        p(f"active slot: {state.active_slot or '-'}")
        for slot, info in slots.items():
            p(f"  {slot:<5} {info['container']:<10} {info['image'] or '-'}")
        p(f"lock:        {_describe_lock(state.lock)}")

    run_command(c, env, "status", body, quiet=json_)


@task(help={"env": ENV_HELP, "limit": "how many entries (default 10)",
            "json_": "machine-readable output"})
def history(c, env=None, limit=10, json_=False):
    """Deployment history, newest first (failed deployments included)."""

    def body(session: Session) -> None:
        try:
            n = int(limit)
        except (TypeError, ValueError):
            raise UsageError(f"--limit must be a number, not {limit!r}") from None
        if n < 1:
            raise UsageError("--limit must be at least 1")
        entries = session.store.read().state.history[:n]
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


def _describe_lock(lock: dict) -> str:
    return describe(lock, utc_now()) if lock.get("locked") else "free"


@task(name="status", help={"env": ENV_HELP, "json_": "machine-readable output"})
def lock_status(c, env=None, json_=False):
    """Who holds the environment's lock, since when, until when."""

    def body(session: Session) -> None:
        lock = session.store.read().state.lock
        if json_:
            session.console.always(jsonlib.dumps(lock, indent=2))
        else:
            session.console.print(f"{session.settings.env}: {_describe_lock(lock)}")

    run_command(c, env, "lock", body, quiet=json_)


@task(name="acquire", help={"env": ENV_HELP, "message": "why (shown to whoever is blocked)"})
def lock_acquire(c, env=None, message=None):
    """Hold the lock by hand (e.g. during maintenance) until `lock.release` or expiry."""

    def body(session: Session) -> None:
        from .ulid import new_id
        if not message:
            raise UsageError("--message is required: say why you hold the lock")
        lock, decision = session.store.acquire(
            session.operator, deployment_id=new_id("dep"), operation="manual",
            timeout_minutes=session.settings.deployment["lock_timeout_minutes"],
            message=message, with_pid=False)
        if decision.replaced:
            session.console.warn(f"took over a lock: {decision.reason}")
        session.console.print(f"{session.settings.env} locked: {lock['lock_id']} by "
                              f"{lock['locked_by']} until {lock['lock_expires_at']}")

    run_command(c, env, "lock", body)


@task(name="release", help={"env": ENV_HELP,
                            "force": "release a lock held by someone else (prints the holder)"})
def lock_release(c, env=None, force=False):
    """Release the environment's lock (yours; anyone's with --force)."""

    def body(session: Session) -> None:
        state = session.store.read().state
        lock = state.lock
        if not lock.get("locked"):
            session.console.print(f"{session.settings.env}: lock already free")
            return
        mine = lock.get("locked_by") == session.operator.email and lock.get("pid") is None
        if not (force or mine):
            from .errors import LockHeldError
            raise LockHeldError(
                f"{session.settings.env} is locked by {_describe_lock(lock)}",
                hint="Only the holder releases it; break it with --force if you are sure the "
                     "holder is gone.")
        if force:
            session.console.warn(f"breaking the lock of {_describe_lock(lock)}")
        session.store.release(lock.get("lock_id"), force=True)
        session.audit(operation="lock.release", lock_id=lock.get("lock_id"), forced=force)
        session.console.print(f"{session.settings.env}: lock released")

    run_command(c, env, "lock", body)


@task(name="validate", help={"env": ENV_HELP})
def config_validate(c, env=None):
    """Validate config/deployment.yml and the environment's secrets file (no host contact)."""
    console = Console(Redactor())
    with guarded(console):
        settings = load(c, env)
        for warning in settings.warnings:
            console.warn(warning)
        console.print(f"{settings.env}: configuration is valid "
                      f"({settings.root / configmod.CONFIG_FILE}, {settings.env_file})")


@task(name="show", help={"env": ENV_HELP, "json_": "machine-readable output"})
def config_show(c, env=None, json_=False):
    """The merged configuration of an environment, every secret redacted."""
    console = Console(Redactor())
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


@task(name="trust", help={"env": ENV_HELP, "yes": "accept without asking"})
def hosts_trust(c, env=None, yes=False):
    """Accept unknown host keys of an environment's hosts (like ssh's accept-new).

    Changed keys are still refused.
    """

    def body(session: Session) -> None:
        if not yes and not sys.stdin.isatty():
            raise UsageError("hosts.trust needs --yes when stdin is not a terminal")
        if not yes:
            answer = input(f"Record the host keys of {', '.join(session.settings.hosts)} as "
                           "trusted? Type 'yes': ")
            if answer.strip().lower() != "yes":
                raise UsageError("not confirmed")
        for host in session.all_hosts:
            host.run("true", timeout=30)
            session.console.print(f"{host.name}: host key trusted")

    run_command(c, env, "hosts", body, accept_new_host_key=True)


def namespace(root: str | Path | None = None) -> Collection:
    """The task collection for an application repository's tasks.py:

        from togather_tasks import namespace
        ns = namespace(__file__)
    """
    ns = Collection(deploy, status, history)
    lock = Collection("lock", lock_status, lock_acquire, lock_release)
    cfg = Collection("config", config_validate, config_show)
    hosts = Collection("hosts", hosts_trust)
    for sub in (lock, cfg, hosts):
        ns.add_collection(sub)
    if root is not None:
        path = Path(root).resolve()
        ns.configure({"togather": {"root": str(path.parent if path.is_file() else path)}})
    return ns
