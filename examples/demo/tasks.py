"""Deploy tasks for this app: `inv --list`, `inv deploy --env=staging`, `inv rollback ...`."""

from togather_tasks import namespace

ns = namespace(__file__)
