"""Several independent read-only probes of one host in one remote command: each command over
SSH costs the host a new session, so the validate step sends its probes (tools and versions,
the state file) as one shell script and cuts the output back into the probes' own outputs.

Each section runs in a subshell (an `exit` or `exec` in one cannot end or redirect another),
between marker lines that carry a random word chosen per run: nothing a probe prints (a state
file's content, a version string) can forge a marker. The script is built and its output
parsed by pure functions; `run_batch` is the thin edge that runs it.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass

from .errors import CommandError
from .hosts import Host

q = shlex.quote


@dataclass(frozen=True)
class Section:
    """One probe's exact standard output and exit status."""

    output: str
    exit_status: int

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def new_marker() -> str:
    return f"--togather-batch-{secrets.token_hex(8)}--"


def batch_script(sections: dict[str, str], marker: str) -> str:
    """One shell script running `sections` (name -> command) in order. Each section's output
    is framed as `MARKER begin NAME\\n` + output + `\\nMARKER end NAME STATUS\\n` (the newline
    before the end line is always added, so the output is recovered byte for byte)."""
    parts = []
    for name, command in sections.items():
        if not name.isidentifier():
            raise ValueError(f"section name {name!r} is not a plain word")
        parts.append(f"printf '%s\\n' {q(f'{marker} begin {name}')}; ( {command}\n); "
                     f"printf '\\n%s %s\\n' {q(f'{marker} end {name}')} \"$?\"")
    return "; ".join(parts)


def parse_batch(output: str, marker: str) -> dict[str, Section]:
    """batch_script's output -> name -> Section, in order. A section whose end line is missing
    (the script was cut) is left out: the caller decides what a missing probe means."""
    found: dict[str, Section] = {}
    begin = f"{marker} begin "
    position = 0
    while (start := output.find(begin, position)) >= 0:
        head_end = output.find("\n", start)
        if head_end < 0:
            break
        name = output[start + len(begin):head_end]
        end_line = f"\n{marker} end {name} "
        end = output.find(end_line, head_end + 1)
        if end < 0:
            break
        status_end = output.find("\n", end + len(end_line))
        status = output[end + len(end_line):status_end if status_end >= 0 else None].strip()
        if not status.isdigit():
            break
        found[name] = Section(output[head_end + 1:end], int(status))
        position = status_end if status_end >= 0 else len(output)
    return found


def run_batch(host: Host, sections: dict[str, str], *, timeout: float,
              what: str) -> dict[str, Section]:
    """Run `sections` on `host` as one command; every section must report back."""
    marker = new_marker()
    result = host.run(batch_script(sections, marker), timeout=timeout, check=False)
    found = parse_batch(result.stdout, marker)
    missing = [name for name in sections if name not in found]
    if missing:
        detail = (result.stderr.strip().splitlines() or [f"exit {result.exit_status}"])[-1]
        raise CommandError(f"{what} on {host.name} did not finish ({', '.join(missing)} "
                           f"missing): {host.redact(detail)[:300]}",
                           exit_status=result.exit_status, stderr=result.stderr)
    return found
