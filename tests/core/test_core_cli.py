"""core.toml, `core run`, `audit verify|report`, `certs init`, `token create`."""

import argparse
import json
import stat

import numpy as np
import pytest
from cli_run import assert_one_line_error, run_cli
from coreproc import CoreProcess, make_deployment
from cryptography import x509

from hyprstream.core import audit, signing, tokens
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.auth import Role
from hyprstream.cli import main
from hyprstream.core.cli import add_parser
from hyprstream.coreapi.client import CoreClient
from hyprstream.core.config import load_core_config
from hyprstream.errors import ConfigError
from hyprstream.store.layer_table import to_table

KEY = signing.generate_key()


@pytest.mark.unit
@pytest.mark.parametrize("argv", [["core", "run"], ["audit", "verify"], ["audit", "report"], ["certs", "init"],
                                  ["token", "create"], ["core"], ["audit"], ["core", "versions"],
                                  ["core", "pull"]])
def test_every_command_has_help(argv, capsys):
    parser = argparse.ArgumentParser(prog="hyprstream")
    add_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: hyprstream" in capsys.readouterr().out


def make_log(path, n=5):
    with AuditLog(path, KEY, sync=False, clock=iter(1_800_000_000.0 + 60 * i for i in range(100)).__next__) as log:
        for i in range(n):
            log.append(f"fog-{i % 2}", "model.push", "model/m", details={"version": i + 1})
    pub = path.parent / "audit.pub"
    signing.write_public_key(pub, KEY.public_key())
    return pub


@pytest.mark.unit
def test_audit_verify_exit_codes_name_the_first_bad_seq(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    pub = make_log(path)
    assert main(["audit", "verify", str(path), "--key", str(pub)]) == 0
    assert "ok: 6 entries" in capsys.readouterr().out
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"fog-0"', b'"fog-9"')
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == 1
    assert "NOT INTACT: seq 4: " in capsys.readouterr().out
    path.write_bytes(b"".join(make_log_lines(tmp_path)[:-2]))
    assert main(["audit", "verify", str(path), "--head", str(tmp_path / "b" / "audit.jsonl.head")]) == 1
    assert "seq 5: missing: the signed head checkpoint records seq 6" in capsys.readouterr().out
    assert main(["audit", "verify", str(path), "--key", str(tmp_path / "nope.pub")]) == 2
    assert "key file not found" in capsys.readouterr().err


def make_log_lines(tmp_path):
    (tmp_path / "b").mkdir()
    make_log(tmp_path / "b" / "audit.jsonl")
    return (tmp_path / "b" / "audit.jsonl").read_bytes().splitlines(keepends=True)


@pytest.mark.unit
def test_audit_report_markdown_and_json(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    make_log(path)  # seq 1 at T, seq k at T + 60 (k - 1) s; T = 2027-01-15T08:00:00Z
    assert main(["audit", "report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| fog-0 | model.push | 3 | 0 | 0 |" in out and "| fog-1 | model.push | 2 | 0 | 0 |" in out
    assert main(["audit", "report", str(path), "--since", "2027-01-15T08:01:00", "--until",
                 "2027-01-15T08:03:00Z", "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["total"], rep["first_seq"], rep["last_seq"], rep["intact"]) == (2, 2, 3, True)
    assert rep["operations"] == [{"actor": "fog-0", "action": "model.push", "ok": 1, "refused": 0, "failed": 0},
                                 {"actor": "fog-1", "action": "model.push", "ok": 1, "refused": 0, "failed": 0}]
    with pytest.raises(SystemExit):
        main(["audit", "report", str(path), "--since", "yesterday"])


@pytest.mark.unit
def test_certs_init_and_token_create(tmp_path, capsys):
    out = tmp_path / "pki"
    assert main(["certs", "init", "--out", str(out), "--client", "fog-a", "--server-name", "core.example",
                 "--server-name", "10.0.0.5"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["audit-signing.key", "audit-signing.pub", "ca.key", "ca.pem", "client-fog-a.key",
                     "client-fog-a.pem", "server.key", "server.pem", "token-signing.key", "token-signing.pub"]
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == (0o600 if p.suffix == ".key" else 0o644), p
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in sans.get_values_for_type(x509.DNSName)] == ["core.example"]
    assert [str(v) for v in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    capsys.readouterr()
    assert main(["certs", "init", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err

    assert main(["token", "create", "--key", str(out / "token-signing.key"), "--sub", "fog-a", "--role", "fog",
                 "--ttl", "2h"]) == 0
    cap = capsys.readouterr()
    claims = tokens.verify(cap.out.strip(), signing.load_public_key(out / "token-signing.pub"), now=0)
    assert (claims.sub, claims.role, claims.exp - claims.iat) == ("fog-a", Role.FOG, 7200)
    assert "not recorded in core's audit log" in cap.err
    log_path = tmp_path / "audit" / "audit.jsonl"
    assert main(["token", "create", "--key", str(out / "token-signing.key"), "--sub", "dash", "--role", "reader",
                 "--audit-log", str(log_path), "--audit-key", str(out / "audit-signing.key")]) == 0
    issued = list(iter_entries(log_path))[-1]
    assert (issued.actor, issued.action, issued.subject, issued.details["role"]) == (
        "cli", "token.issue", "identity/dash", "reader")
    with AuditLog(log_path, signing.load_private_key(out / "audit-signing.key"), sync=False):
        assert main(["token", "create", "--key", str(out / "token-signing.key"), "--sub", "x", "--role", "fog",
                     "--audit-log", str(log_path), "--audit-key", str(out / "audit-signing.key")]) == 1
    assert "in use by another process" in capsys.readouterr().err


@pytest.mark.unit
def test_core_toml_validation_names_file_key_and_reason(tmp_path):
    cfg = tmp_path / "core.toml"
    cfg.write_text('kind = "core"\n[audit]\nsigning_key = "k/audit.key"\n[auth]\ntoken_key = "k/token.key"\n')
    with pytest.raises(ConfigError, match=r"core.toml: tls.cert: required while tls.enabled is true"):
        load_core_config(cfg)
    cfg.write_text('kind = "core"\n[audit]\nsigning_key = "k/audit.key"\n[auth]\ntoken_key = "k/token.key"\n'
                   '[tls]\ncert = "s.pem"\nkey = "/etc/s.key"\n[storage]\nuri = "s3://bucket/core"\n')
    c = load_core_config(cfg)
    assert c.tls.enabled and c.tls.cert == str(tmp_path / "s.pem") and c.tls.key == "/etc/s.key"
    assert c.audit.path == str(tmp_path / "audit" / "audit.jsonl") and c.storage.uri == "s3://bucket/core"
    assert (c.rate_limit.requests_per_s, c.rate_limit.burst, c.server.listen) == (50.0, 100, "127.0.0.1:8815")
    for text, message in [
        ('kind = "device"\n', "kind: must be \"core\""),
        ('kind = "core"\n', "audit: required key is missing"),
        ('kind = "core"\n[audit]\nsigning_key = "a"\n[tls]\nenabled = false\n', "auth.token_key: set auth.token_key"),
        ('kind = "core"\n[audit]\nsigning_key = "a"\n[auth]\ntoken_key = "t"\n[tls]\nenabled = false\n'
         '[server]\nlisten = "nohost"\n', "server.listen: expected host:port"),
        ('kind = "core"\n[audit]\nsigning_key = "a"\n[auth]\ntoken_key = "t"\n[tls]\nenabled = false\n'
         '[rate_limit]\nburst = 0\n', "rate_limit.burst: must be >= 1"),
        ('kind = "core"\n[audit]\nsigning_key = "a"\nsigning_kee = "b"\n', "audit.signing_kee: unknown key"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_core_config(cfg)


@pytest.mark.integration
def test_core_run_with_tls_serves_and_stops_cleanly_on_sigterm(tmp_path):
    from hyprstream.core.certs import init_deployment

    init_deployment(tmp_path / "pki")
    dep = make_deployment(tmp_path, tls={"cert": "pki/server.pem", "key": "pki/server.key"})
    core = CoreProcess(dep.config)
    try:
        assert core.location.startswith("grpc+tls://127.0.0.1:")
        ca = (tmp_path / "pki" / "ca.pem").read_bytes()
        with CoreClient(core.location, dep.token("admin", Role.ADMIN), tls_root_certs=ca) as admin:
            admin.register_model("m", to_table({"fc1.weight": np.zeros(3, np.float32)}))
            assert admin.get_weights("m").version == 0
    finally:
        assert core.terminate() == 0, "".join(core.stderr)
    actions = [e.action for e in iter_entries(dep.audit_log)]
    assert actions[:5] == ["audit.create", "key.load", "key.load", "key.load", "core.start"]
    assert actions[-3:] == ["model.register", "weights.read", "core.stop"]
    assert audit.verify_file(dep.audit_log, dep.audit_key.public_key()).ok
    # a config error stops `core run` with exit code 2
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "core"\n')
    assert main(["core", "run", "--config", str(bad)]) == 2


@pytest.mark.unit
def test_the_example_deployment_config_is_valid():
    from pathlib import Path

    c = load_core_config(Path(__file__).resolve().parents[2] / "deploy" / "core.example.toml")
    assert c.tls.enabled and c.tls.client_ca == "/etc/hyprstream/pki/ca.pem" and c.server.listen == "0.0.0.0:8815"


@pytest.mark.integration
def test_core_run_errors_are_one_line(tmp_path, capsys):
    import socket

    dep = make_deployment(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dep.config.write_text(dep.config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        assert main(["core", "run", "--config", str(dep.config)]) == 1
    assert f"cannot serve on grpc://127.0.0.1:{port}" in capsys.readouterr().err
    AuditLog(dep.audit_log, dep.audit_key, sync=False).close()  # the failed start released the audit log
    (tmp_path / "keys" / "audit.key").chmod(0o644)
    assert main(["core", "run", "--config", str(dep.config)]) == 2
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.unit
def test_audit_verify_refuses_respelt_signatures(tmp_path, capsys):
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def respell(sig):  # same bytes: the unused low bit of the last digit flipped
        body = sig.rstrip("=")
        return body[:-1] + b64[b64.index(body[-1]) ^ 1] + sig[len(body):]

    path = tmp_path / "audit.jsonl"
    pub = make_log(path)
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    sig = json.loads(lines[2])["sig"]
    lines[2] = lines[2].replace(sig.encode(), respell(sig).encode())
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path), "--key", str(pub)]) == 1
    assert "NOT INTACT: seq 3: bad signature" in capsys.readouterr().out
    path.write_bytes(original)
    head = audit.head_path(path)
    cp = json.loads(head.read_bytes())
    head.write_bytes(audit.canonical({**cp, "sig": respell(cp["sig"])}) + b"\n")
    assert main(["audit", "verify", str(path), "--key", str(pub)]) == 1
    assert "NOT INTACT: seq 6: head checkpoint signature is not valid" in capsys.readouterr().out


@pytest.mark.unit
@pytest.mark.parametrize("sub,ttl,reason", [("core", "1h", "identity 'core' is reserved"),
                                            ("anonymous", "1h", "identity 'anonymous' is reserved"),
                                            ("fog-a", "36500d", "token lifetime must be at most 366 days")])
def test_token_create_refuses_reserved_identities_and_long_lifetimes(tmp_path, sub, ttl, reason):
    key = tmp_path / "token.key"
    signing.write_private_key(key, signing.generate_key())
    proc = run_cli("token", "create", "--key", key, "--sub", sub, "--role", "admin", "--ttl", ttl)
    assert proc.stdout == ""
    assert_one_line_error(proc, reason)


@pytest.mark.integration
def test_core_run_on_a_garbage_head_checkpoint_is_a_one_line_error(tmp_path):
    dep = make_deployment(tmp_path)
    dep.audit_log.parent.mkdir()
    dep.audit_log.write_bytes(b"")
    head = audit.head_path(dep.audit_log)
    head.write_bytes(b"\x00garbage{")
    assert_one_line_error(run_cli("core", "run", "--config", dep.config), head, "head checkpoint is not JSON")


@pytest.mark.integration
@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"schema": "hyprstream.core.manifest/1"}', b"\xff\xfe"])
def test_core_run_on_a_corrupt_manifest_is_a_one_line_error(tmp_path, content):
    dep = make_deployment(tmp_path)
    manifest = tmp_path / "models" / "m" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(content)
    assert_one_line_error(run_cli("core", "run", "--config", dep.config), manifest, "not a model manifest")


@pytest.mark.unit
def test_certs_init_under_a_regular_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "pki"
    assert_one_line_error(run_cli("certs", "init", "--out", out), out, "cannot create the directory")


@pytest.mark.integration
@pytest.mark.parametrize("name,content,reason", [("tls.cert", b"garbage", "not a PEM certificate"),
                                                 ("tls.key", b"garbage", "not a PEM private key"),
                                                 ("tls.client_ca", b"", "not a PEM certificate"),
                                                 ("auth.token_key", None, "key file not found")])
def test_core_run_on_an_unusable_tls_or_key_file_names_the_file_and_key(tmp_path, name, content, reason):
    from hyprstream.core.certs import init_deployment

    init_deployment(tmp_path / "pki")
    dep = make_deployment(tmp_path, tls={"cert": "pki/server.pem", "key": "pki/server.key",
                                         "client_ca": "pki/ca.pem"})
    target = {"tls.cert": "pki/server.pem", "tls.key": "pki/server.key", "tls.client_ca": "pki/ca.pem",
              "auth.token_key": "keys/token.key"}[name]
    path = tmp_path / target
    path.unlink()
    if content is not None:
        path.write_bytes(content)
    proc = run_cli("core", "run", "--config", dep.config)
    assert_one_line_error(proc, f"{dep.config}: {name}: {path}", reason)
    assert not dep.audit_log.exists()  # refused before anything started


@pytest.mark.integration
@pytest.mark.parametrize("case", ["deep_head", "log_is_a_directory", "log_under_a_file"])
def test_core_run_on_an_unusable_audit_log_path_is_a_one_line_error(tmp_path, case):
    dep = make_deployment(tmp_path)
    head = audit.head_path(dep.audit_log)
    if case == "deep_head":
        dep.audit_log.parent.mkdir()
        dep.audit_log.write_bytes(b"")
        head.write_bytes(b"[" * 100_000)
        named, reason = head, "head checkpoint is not JSON"
    elif case == "log_is_a_directory":
        dep.audit_log.mkdir(parents=True)
        named, reason = dep.audit_log, "cannot read"
    else:
        dep.audit_log.parent.write_text("a file where the log's directory should be")
        named, reason = dep.audit_log, "cannot open the audit log"
    assert_one_line_error(run_cli("core", "run", "--config", dep.config), named, reason)


@pytest.mark.unit
def test_audit_verify_on_a_deeply_nested_line_names_its_seq(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    pub = make_log(path)
    with path.open("ab") as fh:
        fh.write(b"[" * 100_000 + b"\n")
    assert main(["audit", "verify", str(path), "--key", str(pub)]) == 1
    assert "NOT INTACT: seq 7: unreadable entry: not JSON" in capsys.readouterr().out


@pytest.mark.integration
def test_core_versions_and_pull_with_the_deployments_credentials(tmp_path, capsys, monkeypatch):
    """`core versions` lists the lineage (with the privacy a round spent) and `core pull` writes a version as
    an Arrow file or, for a task, as ONNX whose outputs are the task model's with those weights; a reader token
    is enough, a missing or wrong one is refused with a one-line error."""
    import onnxruntime as ort
    import pyarrow as pa
    import torch

    from hyprstream.core.certs import init_deployment
    from hyprstream.learning.task import get_task
    from hyprstream.learning.trainer import load_weights, model_weights
    from hyprstream.store.layer_table import to_arrays
    from hyprstream.vector_clock import VectorClock

    init_deployment(tmp_path / "pki")
    dep = make_deployment(tmp_path, tls={"cert": "pki/server.pem", "key": "pki/server.key"})
    core = CoreProcess(dep.config)
    task = get_task("digits")
    weights = model_weights(task.build_model(seed=0))
    try:
        ca = tmp_path / "pki" / "ca.pem"
        with CoreClient(core.location, dep.token("admin", Role.ADMIN), tls_root_certs=ca.read_bytes()) as admin:
            admin.register_model("m", to_table(weights, layer=task.layer_of))
        with CoreClient(core.location, dep.token("fog-a", Role.FOG), tls_root_certs=ca.read_bytes()) as fog:
            delta = {"head.bias": np.full(weights["head.bias"].shape, 0.5, np.float32)}
            fog.push_delta("m", to_table(delta, layer=task.layer_of), fog="fog-a", seq=1,
                           base_clocks={"head": VectorClock()}, participants=3)
            fog.push_delta("m", to_table(delta, layer=task.layer_of), fog="fog-a", seq=2,
                           base_clocks={"head": VectorClock.of({"fog-a": 1})}, participants=0,
                           privacy={"epsilon": 1.25, "delta": 1e-5})
            fog.report_evaluation("m", 1, fog="fog-a", loss=0.4, accuracy=0.8125, devices=2)
        reader = tmp_path / "reader.token"
        reader.write_text(dep.token("dashboard", Role.READER) + "\n")
        client = ["--core", core.location, "--ca", str(ca), "--token-file", str(reader)]

        assert main(["core", "versions", "m", *client]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["version", "created", "fog", "seq", "layers", "participants", "weight",
                                    "staleness", "update_norm", "epsilon", "accuracy", "federated"]
        assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
        assert lines[2].split()[2:6] == ["fog-a", "1", "head", "3"] and lines[3].split()[-3:] == ["1.25", "-", "-"]
        assert lines[2].split()[-1] == "0.8125"  # the fog's federated evaluation of version 1
        monkeypatch.setenv("HYPRSTREAM_TOKEN", reader.read_text().strip())  # the environment instead of a file
        assert main(["core", "versions", "m", "--core", core.location, "--ca", str(ca), "--format", "json"]) == 0
        lineage = json.loads(capsys.readouterr().out)
        assert lineage[2]["privacy"] == {"epsilon": 1.25, "delta": 1e-5} and lineage[1]["privacy"] is None

        assert main(["core", "pull", "m", "--version", "1", "--out", str(tmp_path / "v1.arrow"), *client]) == 0
        with pa.ipc.open_file(tmp_path / "v1.arrow") as f:
            table = f.read_all()
        meta = table.schema.metadata
        assert meta[b"hyprstream.model"] == b"m" and meta[b"hyprstream.version"] == b"1"
        assert json.loads(meta[b"hyprstream.clocks"])["head"] == {"fog-a": 1}
        pulled = to_arrays(table)
        np.testing.assert_array_equal(pulled["head.bias"], weights["head.bias"] + 0.5)
        np.testing.assert_array_equal(pulled["fc1.weight"], weights["fc1.weight"])

        assert main(["core", "pull", "m", "--onnx", "digits", "--out", str(tmp_path / "m.onnx"), *client]) == 0
        model = task.build_model(seed=0)
        load_weights(model, {**weights, "head.bias": weights["head.bias"] + 1.0})  # version 2: two pushes
        x = np.asarray(task.example_input(5), np.float32)
        expected = model.eval()(torch.as_tensor(x)).detach().numpy()
        got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        capsys.readouterr()

        # bad credentials and bad requests: one line each, nothing written
        monkeypatch.delenv("HYPRSTREAM_TOKEN")
        assert main(["core", "versions", "m", "--core", core.location, "--ca", str(ca)]) == 2
        assert "no token: pass --token-file FILE or set HYPRSTREAM_TOKEN" in capsys.readouterr().err
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-a-token\n")
        assert main(["core", "versions", "m", "--core", core.location, "--ca", str(ca), "--token-file", str(wrong)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "hyprstream: error:" in err, err
        assert main(["core", "pull", "nope", "--out", str(tmp_path / "x.arrow"), *client]) == 1
        assert main(["core", "pull", "m", "--onnx", "sensor", "--out", str(tmp_path / "x.onnx"), *client]) == 1
        assert "does not fit task 'sensor'" in capsys.readouterr().err
        assert not (tmp_path / "x.arrow").exists() and not (tmp_path / "x.onnx").exists()
    finally:
        assert core.terminate() == 0, "".join(core.stderr)


def _get(url: str, token: str | None = None) -> tuple[int, str, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


@pytest.mark.integration
def test_core_serves_metrics_and_health_counted_from_its_audit_log(tmp_path):
    """`core run` serves /metrics (Prometheus text format, conventional names, full precision), /healthz and
    /readyz; with a token file every request needs the token. Pushes are counted by outcome and refusal code,
    and each model's version is read at the scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    from hyprstream.vector_clock import VectorClock

    (tmp_path / "metrics.token").write_text("scrape-secret\n")
    dep = make_deployment(tmp_path, metrics='token_file = "metrics.token"')
    core = CoreProcess(dep.config)
    try:
        assert core.metrics and core.metrics.startswith("http://127.0.0.1:")
        assert _get(core.metrics + "/metrics")[0] == 401
        assert _get(core.metrics + "/metrics", "wrong")[0] == 401
        assert _get(core.metrics + "/healthz", "scrape-secret")[::2] == (200, f"ok: serving on {core.location}\n")
        assert _get(core.metrics + "/readyz", "scrape-secret")[0] == 200
        assert _get(core.metrics + "/admin", "scrape-secret")[0] == 404
        with CoreClient(core.location, dep.token("admin", Role.ADMIN)) as admin:
            admin.register_model("m", to_table({"fc1.weight": np.zeros(3, np.float32)}))
        with CoreClient(core.location, dep.token("fog-a", Role.FOG)) as fog:
            for seq in (1, 2):
                fog.push_delta("m", to_table({"fc1.weight": np.full(3, seq, np.float32)}), fog="fog-a", seq=seq,
                               base_clocks={"fc1": VectorClock()}, participants=2)
            with pytest.raises(Exception, match="replay"):
                fog.push_delta("m", to_table({"fc1.weight": np.ones(3, np.float32)}), fog="fog-a", seq=2,
                               base_clocks={"fc1": VectorClock()}, participants=2)
        status, ctype, text = _get(core.metrics + "/metrics", "scrape-secret")
        assert status == 200 and ctype.startswith("text/plain; version=")  # the text exposition format
    finally:
        assert core.terminate() == 0, "".join(core.stderr)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    for f in families.values():  # the exposition's conventions: a prefix, counters as _total, seconds
        assert f.name.startswith("hyprstream_core_") and f.documentation, f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
    assert samples[("hyprstream_core_pushes_total", (("code", ""), ("fog", "fog-a"), ("model", "m"),
                                                     ("outcome", "ok")))] == 2
    assert samples[("hyprstream_core_pushes_total", (("code", "replay"), ("fog", "fog-a"), ("model", "m"),
                                                     ("outcome", "refused")))] == 1
    assert samples[("hyprstream_core_model_version", (("model", "m"),))] == 2
    assert samples[("hyprstream_core_audit_entries_total", (("action", "model.register"), ("outcome", "ok")))] == 1
    entries = list(iter_entries(dep.audit_log))
    assert samples[("hyprstream_core_audit_last_seq", ())] == entries[-2].seq  # the last: core.stop, after it
    committed = max(e for (name, _), e in samples.items() if name == "hyprstream_core_model_last_commit_timestamp_seconds")
    assert committed > 1.7e9 and committed != round(committed)  # a Unix time in full precision, not 1.79e+09


@pytest.mark.unit
def test_metrics_settings_are_checked(tmp_path):
    dep = make_deployment(tmp_path)
    text = dep.config.read_text()
    for listen, reason in (('"0.0.0.0:9465"', "beyond loopback need a token_file"), ('"9465"', "expected host:port")):
        dep.config.write_text(text.replace('listen = "127.0.0.1:0"\n', f"listen = {listen}\n"))
        with pytest.raises(ConfigError, match=reason):
            load_core_config(dep.config)
