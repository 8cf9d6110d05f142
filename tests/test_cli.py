import subprocess
import sys
from pathlib import Path

import pytest

from hyprstream.cli import build_parser, main

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def _commands(parser, prefix=()):
    """Every command path of the parser, found by walking its subparsers."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = list(_commands(parser))
    assert {("simulate",), ("config", "validate"), ("store", "query"), ("fog", "run"), ("core", "run"),
            ("audit", "verify"), ("certs", "init"), ("token", "create")} <= set(commands)
    for argv in commands:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*argv, "--help"])
        assert info.value.code == 0, argv
        assert "usage: hyprstream" in capsys.readouterr().out


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("hyprstream 0.")


def test_config_validate_accepts_shipped_files(capsys):
    files = sorted((ROOT / "firmware-configs").glob("*.toml")) + sorted((ROOT / "simulations").glob("*.toml"))
    assert len(files) >= 4
    assert main(["config", "validate", *map(str, files)]) == 0
    assert capsys.readouterr().out.count("ok ") == len(files)


def test_config_validate_names_file_key_and_reason(tmp_path, capsys):
    bad = tmp_path / "exp.toml"
    bad.write_text((ROOT / "simulations" / "quickstart.toml").read_text().replace("local_steps = 40", "local_steps = 0"))
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: training.local_steps: must be >= 1, got 0" in err


def test_config_validate_unknown_kind(tmp_path, capsys):
    f = tmp_path / "x.toml"
    f.write_text('kind = "toaster"\n')
    assert main(["config", "validate", str(f)]) == 2
    assert f"{f}: kind: must be one of" in capsys.readouterr().err


def test_simulate_missing_experiment_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hyprstream.cli", "simulate", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "not found" in proc.stderr


def run_cli(*argv, cwd=None):
    """The real ``hyprstream`` entry point in a process of its own."""
    return subprocess.run([sys.executable, "-m", "hyprstream.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def assert_one_line_error(proc, *fragments):
    """Exit 2 and exactly one line on stderr, holding every fragment, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    for fragment in fragments:
        assert str(fragment) in proc.stderr, (fragment, proc.stderr)


@pytest.mark.parametrize("argv", [("config", "validate"), ("core", "run", "--config"), ("fog", "run", "--config"),
                                  ("agent", "run", "--config"), ("agent", "trace", "--out", "t.csv", "--config")])
def test_a_deeply_nested_toml_file_is_a_one_line_error(tmp_path, argv):
    deep = tmp_path / "deep.toml"
    deep.write_text('kind = "core"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    assert_one_line_error(run_cli(*argv, deep, cwd=tmp_path), f"{deep}: invalid TOML: nested too deeply")
