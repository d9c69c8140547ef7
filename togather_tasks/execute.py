"""`inv exec`: the operator's command with the app's image and environment on the primary
host, in a one-off container (default: nothing that serves is touched) or inside the running
active slot. Its exit status becomes the task's."""

from __future__ import annotations

import threading

from . import commands as cmd
from . import slots
from .errors import UsageError
from .logs import active_slot
from .session import Session

EXEC_SLOTS = ("new", "active")


def check_exec(command: str | None, slot: str) -> str:
    if slot not in EXEC_SLOTS:
        raise UsageError(f"--slot must be new (a one-off container, default) or active (the "
                         f"running slot), not {slot!r}")
    if not command or not command.strip():
        raise UsageError('--command is required, e.g. --command="bin/console migrate-status"')
    return command


def run_in_app(session: Session, command: str, *, slot: str, interactive: bool) -> int:
    """Run `command` and return its exit status. Without a terminal its output passes through
    the console line by line (secrets masked); with one (--interactive) it is the operator's
    own console, raw."""
    active = active_slot(session, hint="Deploy first: exec runs the deployed image.")
    line = cmd.exec_command(session.settings, active, command, one_off=slot == "new",
                            interactive=interactive)
    host = session.primary
    if slot == "new":
        # The one-off container needs compose.oneoff.yml, which a host deployed by an older
        # version lacks.
        slots.write_oneoff_file(host, cmd.Layout(session.settings.remote_dir))
    if interactive:
        return host.interact(line)
    console = session.console

    def sink(text: str, from_stderr: bool) -> None:
        (console.note if from_stderr else console.always)(text)

    return host.stream(line, sink, stop=threading.Event()).exit_status
