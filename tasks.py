"""Tasks for deploying the Togather server from this repository (`inv --list`)."""

from togather_tasks import namespace

ns = namespace(__file__)
