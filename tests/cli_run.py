"""The real ``hyprstream`` entry point in a process of its own, and what a one-line CLI error looks like."""

import subprocess
import sys


def run_cli(*argv, cwd=None):
    """``python -m hyprstream.cli ARGV...``, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "hyprstream.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def assert_one_line_error(proc, *fragments):
    """Exit 2 and exactly one line on stderr, holding every fragment, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    for fragment in fragments:
        assert str(fragment) in proc.stderr, (fragment, proc.stderr)
