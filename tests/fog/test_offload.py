"""Inference offload: the fog's HTTP endpoint (real core Flight server on loopback) and the agent's client."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from hyprstream.agent.inference import TorchPredictor
from hyprstream.agent.offload import OffloadClient
from hyprstream.coreapi.client import CoreClient
from hyprstream.errors import AuthError, ConfigError, TransportError, ValidationError
from hyprstream.fog.offload import INFER_PATH, ModelSource, OffloadServer, read_tokens
from hyprstream.store import to_arrays, to_table

pytestmark = pytest.mark.integration

TOKEN = "agent-token-5d2a"


def local_predictions(task, weights, x):
    return task.interpret(TorchPredictor(task, weights)(np.asarray(x, dtype=np.float32)))


def test_predictions_equal_local_inference_and_follow_new_versions(site):
    task = site.task
    _, test = task.load_reference_data(seed=0)
    x = test.x[:16]
    with CoreClient(site.location, "fog") as core, \
            OffloadServer(ModelSource(core, "m", task, refresh_s=0.0), (TOKEN,)) as server:
        client = OffloadClient(server.url, TOKEN)
        got = client.infer("digits", x)
        v0 = to_arrays(core.get_weights("m").table, copy=True)
        pred, score = local_predictions(task, v0, x)
        assert (got.model, got.version, got.task) == ("m", 0, "digits")
        np.testing.assert_array_equal(got.predictions, pred)
        np.testing.assert_allclose(got.scores, score, rtol=1e-6)

        # core gets a new version: the next answer comes from it
        rng = np.random.default_rng(0)
        delta = {name: rng.normal(0, 0.5, a.shape).astype(a.dtype)
                 for name, a in v0.items() if name.startswith("head.")}
        snap = core.get_weights("m")
        layer = dict(zip(snap.table.column("name").to_pylist(), snap.table.column("layer").to_pylist(), strict=True))
        core.push_delta("m", to_table(delta, layer=layer.__getitem__), fog="fog-a", seq=1,
                        base_clocks={"head": snap.clocks["head"]}, participants=1)
        v1 = to_arrays(core.get_weights("m").table, copy=True)
        got = client.infer("digits", x.tolist())
        pred1, score1 = local_predictions(task, v1, x)
        assert got.version == 1
        np.testing.assert_array_equal(got.predictions, pred1)
        np.testing.assert_allclose(got.scores, score1, rtol=1e-6)
        assert not np.allclose(score1, score)  # the new version answers differently


def raw_post(server, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("POST", INFER_PATH, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_auth_and_bad_bodies_are_refused_with_clear_errors(site, tmp_path):
    task = site.task
    row = task.example_input(1)[0].tolist()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# offload tokens\n\nother-token\n{TOKEN}\n")
    with CoreClient(site.location, "fog") as core, \
            OffloadServer(ModelSource(core, "m", task), read_tokens(tokens), max_rows=4,
                          max_body_bytes=64 * 1024) as server:
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        ok = json.dumps({"task": "digits", "inputs": [row]}).encode()
        assert raw_post(server, ok, auth)[0] == 200
        assert raw_post(server, ok, {**auth, "Authorization": "Bearer other-token"})[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, answer = raw_post(server, ok, headers)
            assert (status, answer) == (401, {"error": "missing or invalid bearer token"})
        with pytest.raises(AuthError, match="invalid bearer token"):
            OffloadClient(server.url, "wrong").infer("digits", [row])

        cases = [
            (b"{not json", 400, "not JSON"),
            (b"[1, 2]", 400, "must be a JSON object"),
            (json.dumps({"task": "digits", "inputs": [row], "extra": 1}).encode(), 400, "unknown key"),
            (json.dumps({"task": "cifar", "inputs": [row]}).encode(), 400, "serves task 'digits'"),
            (json.dumps({"task": "digits", "inputs": []}).encode(), 400, "non-empty list"),
            (json.dumps({"task": "digits", "inputs": [row, row[:-1]]}).encode(), 400, "rows of numbers"),
            (json.dumps({"task": "digits", "inputs": [row + [0.0]]}).encode(), 400, "each row must have shape"),
            (json.dumps({"task": "digits", "inputs": [["a"] * len(row)]}).encode(), 400, "rows of numbers"),
            (json.dumps({"task": "digits", "inputs": [row] * 5}).encode(), 413, "5 rows exceed the limit of 4"),
            (b" " * (64 * 1024 + 1), 413, "exceeds the limit of 65536 bytes"),
        ]
        for body, code, message in cases:
            status, answer = raw_post(server, body, auth)
            assert status == code and message in answer["error"], (body[:40], status, answer)
        for bad in (float("nan"), float("inf")):  # Python's json writes and reads NaN and Infinity
            body = json.dumps({"task": "digits", "inputs": [[bad, *row[1:]]]}).encode()
            status, answer = raw_post(server, body, auth)
            assert (status, answer) == (400, {"error": "'inputs' must be finite numbers"})
        with pytest.raises(ValidationError, match="5 rows exceed"):
            OffloadClient(server.url, TOKEN).infer("digits", [row] * 5)
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("POST", "/v1/other", body=ok, headers=auth)
        assert conn.getresponse().status == 404
        conn.close()
        counts = server.counts()
        assert counts["requests"] - counts["refused"] == 2  # the two with a valid token and body


def test_tls_endpoint_and_unreachable_core(site, tmp_path):
    from hyprstream.core.certs import init_deployment

    init_deployment(tmp_path / "pki")
    pki = tmp_path / "pki"
    task = site.task
    row = task.example_input(1)[0].tolist()
    with CoreClient(site.location, "fog") as core, \
            OffloadServer(ModelSource(core, "m", task), (TOKEN,), host="127.0.0.1",
                          certfile=str(pki / "server.pem"), keyfile=str(pki / "server.key")) as server:
        assert server.url.startswith("https://")
        got = OffloadClient(server.url, TOKEN, tls_root_cert=pki / "ca.pem").infer("digits", [row])
        assert got.version == 0 and got.predictions.shape == (1,)
        with pytest.raises(TransportError, match="unreachable"):  # the system CAs do not know this one
            OffloadClient(server.url, TOKEN).infer("digits", [row])
    # a fog whose core is gone and that has never pulled a model answers 503
    with CoreClient("grpc://127.0.0.1:1", "fog", timeout_s=2.0) as gone, \
            OffloadServer(ModelSource(gone, "m", task), (TOKEN,)) as server, \
            pytest.raises(TransportError, match="503: no model to serve yet"):
        OffloadClient(server.url, TOKEN).infer("digits", [row])


@pytest.mark.unit
def test_settings_are_checked(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no token"):
        read_tokens(empty)
    with pytest.raises(ConfigError, match="cannot read"):
        read_tokens(tmp_path / "missing")
    with pytest.raises(ConfigError, match="http"):
        OffloadClient("ftp://x", TOKEN)
    with pytest.raises(ConfigError, match="empty"):
        OffloadClient("http://127.0.0.1:1/v1/infer", "")
    assert TOKEN not in repr(OffloadClient("http://127.0.0.1:1/v1/infer", TOKEN))
