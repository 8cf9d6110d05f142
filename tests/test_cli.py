import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import assert_one_line_error, run_cli

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


@pytest.mark.parametrize("argv", [("config", "validate"), ("core", "run", "--config"), ("fog", "run", "--config"),
                                  ("agent", "run", "--config"), ("agent", "trace", "--out", "t.csv", "--config")])
def test_a_deeply_nested_toml_file_is_a_one_line_error(tmp_path, argv):
    deep = tmp_path / "deep.toml"
    deep.write_text('kind = "core"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    assert_one_line_error(run_cli(*argv, deep, cwd=tmp_path), f"{deep}: invalid TOML: nested too deeply")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A deployment's real keys and certificates (``hyprstream certs init``) and a fog token file."""
    from hyprstream.core.certs import init_deployment

    out = tmp_path_factory.mktemp("pki")
    init_deployment(out, clients=["fog-a"])
    (out / "fog-a.token").write_text("hst1.claims.sig\n")
    return out


def core_toml(pki, tmp_path, **files):
    paths = {"audit.signing_key": pki / "audit-signing.key", "auth.token_key": pki / "token-signing.key",
             "tls.cert": pki / "server.pem", "tls.key": pki / "server.key", "tls.client_ca": pki / "ca.pem", **files}
    sections: dict[str, list[str]] = {}
    for dotted, value in paths.items():
        section, key = dotted.split(".")
        sections.setdefault(section, []).append(f'{key} = "{value}"')
    cfg = tmp_path / "core.toml"
    cfg.write_text('kind = "core"\n' + "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    return cfg


def fog_toml(pki, tmp_path, **files):
    paths = {"core.token_file": pki / "fog-a.token", "core.tls_root_cert": pki / "ca.pem",
             "core.tls_client_cert": pki / "client-fog-a.pem", "core.tls_client_key": pki / "client-fog-a.key",
             "superlink.ssl_certfile": pki / "server.pem", "superlink.ssl_keyfile": pki / "server.key",
             "superlink.ssl_ca_certfile": pki / "ca.pem", **files}
    sections: dict[str, list[str]] = {"core": ['location = "grpc+tls://127.0.0.1:8815"', 'model = "m"']}
    for dotted, value in paths.items():
        section, key = dotted.split(".")
        sections.setdefault(section, []).append(f'{key} = "{value}"')
    cfg = tmp_path / "fog.toml"
    cfg.write_text('kind = "fog"\nname = "fog-a"\n' +
                   "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    return cfg


def test_config_validate_loads_every_file_a_config_names(pki, tmp_path, capsys):
    core, fog = core_toml(pki, tmp_path), fog_toml(pki, tmp_path)
    assert main(["config", "validate", str(core), str(fog)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok      {core} (core)", f"ok      {fog} (fog)"]


def _unusable(tmp_path):
    """Files that exist but cannot be what a config needs, by name."""
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "empty.token").write_text("  \n")
    (tmp_path / "a-directory").mkdir()
    return tmp_path


@pytest.mark.parametrize("key,name,reason", [
    ("audit.signing_key", "missing.key", "key file not found"),
    ("audit.signing_key", "garbage.pem", "private key is accessible by group or others (mode 644): chmod 600"),
    ("auth.token_key", "a-directory", "cannot read key file"),
    ("auth.token_public_keys", "garbage.pem", "not a PEM public key"),
    ("tls.cert", "missing.pem", "file not found"),
    ("tls.cert", "garbage.pem", "not a PEM certificate"),
    ("tls.key", "a-directory", "not a regular file"),
    ("tls.key", "ca.pem", "not a PEM private key"),
    ("tls.client_ca", "empty.token", "not a PEM certificate"),
])
def test_config_validate_names_a_core_configs_unusable_file(pki, tmp_path, capsys, key, name, reason):
    target = pki / name if name == "ca.pem" else _unusable(tmp_path) / name
    value = f'["{target}"]' if key == "auth.token_public_keys" else target
    cfg = core_toml(pki, tmp_path, **{key: value})
    if key == "auth.token_public_keys":  # an array: written as TOML, not as a string
        cfg.write_text(cfg.read_text().replace(f'"{value}"', value))
        key = "auth.token_public_keys[0]"
    assert main(["config", "validate", str(cfg)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert cap.err.startswith(f"invalid {cfg}: {key}: {target}: {reason}"), cap.err


@pytest.mark.parametrize("key,name,reason", [
    ("core.token_file", "missing.token", "file not found"),
    ("core.token_file", "empty.token", "the token file is empty"),
    ("core.tls_root_cert", "garbage.pem", "not a PEM certificate"),
    ("core.tls_client_cert", "missing.pem", "file not found"),
    ("core.tls_client_key", "empty.token", "not a PEM private key"),
    ("superlink.ssl_certfile", "a-directory", "not a regular file"),
    ("superlink.ssl_keyfile", "garbage.pem", "not a PEM private key"),
    ("superlink.ssl_ca_certfile", "missing.pem", "file not found"),
])
def test_config_validate_names_a_fog_configs_unusable_file(pki, tmp_path, capsys, key, name, reason):
    target = _unusable(tmp_path) / name
    cfg = fog_toml(pki, tmp_path, **{key: target})
    assert main(["config", "validate", str(cfg)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert cap.err.startswith(f"invalid {cfg}: {key}: {target}: {reason}"), cap.err


def test_config_validate_resolves_a_core_configs_relative_paths_against_its_file(pki, tmp_path, capsys):
    import shutil

    shutil.copytree(pki, tmp_path / "pki")
    cfg = core_toml(pki, tmp_path, **{"tls.cert": "pki/server.pem", "tls.key": "pki/nope.key"})
    assert main(["config", "validate", str(cfg)]) == 2  # run from another directory than the file's
    assert f"tls.key: {tmp_path / 'pki' / 'nope.key'}: file not found" in capsys.readouterr().err


def test_fog_run_and_core_run_refuse_an_unusable_file_before_starting(pki, tmp_path):
    _unusable(tmp_path)
    fog = fog_toml(pki, tmp_path, **{"core.token_file": tmp_path / "empty.token"})
    assert_one_line_error(run_cli("fog", "run", "--config", fog, cwd=tmp_path),
                          f"{fog}: core.token_file: {tmp_path / 'empty.token'}: the token file is empty")
    core = core_toml(pki, tmp_path, **{"tls.cert": tmp_path / "garbage.pem"})
    assert_one_line_error(run_cli("core", "run", "--config", core, cwd=tmp_path),
                          f"{core}: tls.cert: {tmp_path / 'garbage.pem'}: not a PEM certificate")
