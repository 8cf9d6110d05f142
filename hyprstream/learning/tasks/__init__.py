"""Built-in tasks (importing this package registers them): ``digits``, ``digits-cnn``, ``fashion_mnist``,
``sensor``, ``text``."""

from hyprstream.learning.tasks import digits, fashion, sensor, text  # noqa: F401
