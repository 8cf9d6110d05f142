"""Built-in tasks (importing this package registers them)."""

from hyprstream.agent.tasks import digits  # noqa: F401
