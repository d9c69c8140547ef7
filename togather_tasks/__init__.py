"""togather-tasks: zero-downtime blue-green deploys of a containerised web service over SSH,
as Invoke tasks. An application repository's tasks.py needs two lines:

    from togather_tasks import namespace
    ns = namespace(__file__)
"""

__version__ = "0.1.0"


def namespace(root=None):
    """Build the task collection (imported lazily so `import togather_tasks` stays cheap)."""
    from .cli import namespace as build

    return build(root)


__all__ = ["namespace", "__version__"]
