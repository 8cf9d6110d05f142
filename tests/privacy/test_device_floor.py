"""A device enforces its own privacy floor (``[privacy.floor]`` of its profile) against whatever the fog asks.

The fog here deviates on purpose: it builds train and secure-aggregation setup messages itself, with the
project's own wire code, and sends them through the in-process loopback grid to the agent's real ClientApp
(``hyprstream.agent.client_app:app``), which runs as on a device: a store, the daemon's policy state and
the profile it names."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from privacy_helpers import make_devices

from hyprstream.agent.client_app import app
from hyprstream.agent.handoff import PolicyState, write_policy
from hyprstream.agent.profile import Strategy, load_profile
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.errors import ConfigError
from hyprstream.fog.loopback import LoopbackGrid
from hyprstream.privacy import secagg_messages as wire
from hyprstream.privacy.clipping import Layout
from hyprstream.privacy.contribution import InputSpec
from hyprstream.privacy.quantize import Quantizer
from hyprstream.privacy.secagg_messages import Setup, Stage, Status
from hyprstream.protocol import (EVALUATE_MESSAGE_TYPE, EvaluateReply, EvaluateRequest, ReplyStatus, TrainReply,
                                 TrainRequest)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLOOR = """
[privacy.floor]
secure_aggregation = true
min_threshold_fraction = 0.6
min_cohort = 5
max_clip = 2.0
min_noise_multiplier = 0.5
allow_offload = false
"""


def profile_with(tmp_path: Path, section: str, base: str = "x86-gateway") -> Path:
    path = tmp_path / f"{base}-floor.toml"
    path.write_text((ROOT / "firmware-configs" / f"{base}.toml").read_text() + section)
    return path


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """One device (its store, the daemon's policy state naming a profile with FLOOR) behind the loopback grid."""
    root = tmp_path_factory.mktemp("floor")
    (store,) = make_devices(root, 1, rows=80)
    state = root / "state"
    state.mkdir()
    write_policy(state, PolicyState(Strategy.FULL, time.time(), 3600.0, False, "test",
                                    str(profile_with(root, FLOOR))))
    config = {"store-dir": str(store), "state-dir": str(state), "device-id": "dev-a"}
    with LoopbackGrid(app, [1], node_config=lambda node: config) as grid:
        yield grid


def request() -> TrainRequest:
    task = get_task("digits")
    return TrainRequest("digits", 3, "digits", ("head",), local_steps=2, batch_size=16, lr=0.01, seed=1,
                        weights=model_weights(task.build_model(seed=0)))


def setup_message(*, neighbours: int, threshold: int, clip: float, noise: float) -> RecordDict:
    """A setup for this device (index 1) with ``neighbours`` neighbours, Shamir ``threshold``, ``clip`` and
    distributed noise of multiplier ``noise`` (the std each client adds, over its clip)."""
    req = request()
    task = get_task("digits")
    layout = Layout.of({name: tuple(np.shape(w)) for name, w in req.weights.items() if task.layer_of(name) == "head"})
    quantizer = Quantizer.for_clients(clip=clip, max_clients=neighbours + 1, noise_std=noise * clip)
    spec = InputSpec(layout, clip, quantizer, noise_sigma=noise * clip * quantizer.scale)
    setup = Setup(b"\x07" * 16, 1, tuple(range(2, neighbours + 2)), threshold, spec)
    return wire.setup_content(req.to_content(), setup)


def ask(grid: LoopbackGrid, content, message_type: str):
    (reply,) = grid.send_and_receive([grid.create_message(content, message_type, 1, "round-1")])
    assert not reply.has_error(), reply.error.reason
    return reply.content


def test_a_plain_request_to_a_device_that_requires_secure_aggregation_is_declined(device):
    reply = TrainReply.from_content(ask(device, request().to_content(), "train.layerwise"))
    assert reply.status is ReplyStatus.DECLINED and reply.delta == {}
    assert "requires secure aggregation" in reply.reason and "privacy.floor.secure_aggregation" in reply.reason


def test_a_device_that_requires_secure_aggregation_answers_no_plain_evaluation(device):
    """Federated evaluation sends each device's scores to the fog in the clear: below this floor."""
    req = request()
    content = EvaluateRequest(req.model, req.model_version, req.task, req.weights).to_content()
    reply = EvaluateReply.from_content(ask(device, content, EVALUATE_MESSAGE_TYPE))
    assert reply.status is ReplyStatus.DECLINED and "requires secure aggregation" in reply.reason


def test_a_secure_round_at_the_floor_is_answered(device):
    """The floor is a floor, not a refusal of everything: a round that meets it gets the client's keys."""
    content = ask(device, setup_message(neighbours=6, threshold=4, clip=2.0, noise=0.5), wire.SECAGG_MESSAGE_TYPE)
    h = wire.header(content)
    assert (h.stage, h.status) == (Stage.SETUP, Status.OK), h.reason
    advert = wire.advert_from(content)  # three 32-byte keys: the client takes part
    assert all(len(key) == 32 for key in (advert.enc_key, advert.mask_key, advert.commitment))


@pytest.mark.parametrize(("setup", "key"), [
    (dict(neighbours=6, threshold=3, clip=1.0, noise=0.6), "min_threshold_fraction"),  # 3/6 < 0.6
    (dict(neighbours=3, threshold=2, clip=1.0, noise=0.6), "min_cohort"),  # 4 clients < 5
    (dict(neighbours=6, threshold=4, clip=2.5, noise=0.6), "max_clip"),
    (dict(neighbours=6, threshold=4, clip=1.0, noise=0.3), "min_noise_multiplier"),
    (dict(neighbours=6, threshold=4, clip=1.0, noise=0.0), "min_noise_multiplier"),  # no distributed noise at all
])
def test_a_secure_round_below_the_floor_is_declined_with_the_reason(device, setup, key):
    before = len(device.seconds)
    content = ask(device, setup_message(**setup), wire.SECAGG_MESSAGE_TYPE)
    h = wire.header(content)
    assert (h.stage, h.status) == (Stage.SETUP, Status.DECLINED)
    assert f"privacy.floor.{key}" in h.reason, h.reason
    assert len(device.seconds) == before + 1


def test_floor_errors_name_the_file_and_the_key(tmp_path):
    cases = {
        "max_clip = -1.0": "privacy.floor.max_clip",
        "min_threshold_fraction = 1.5": "privacy.floor.min_threshold_fraction",
        "min_cohort = 4": "privacy.floor.min_cohort",  # without secure_aggregation = true: nothing to hold it to
        "allow_offload = 1": "privacy.floor.allow_offload",
    }
    for line, key in cases.items():
        path = profile_with(tmp_path, f"\n[privacy.floor]\n{line}\n")
        with pytest.raises(ConfigError) as err:
            load_profile(path)
        assert str(path) in str(err.value) and key in str(err.value), str(err.value)
    floor = load_profile(profile_with(tmp_path, FLOOR)).privacy.floor
    assert (floor.secure_aggregation, floor.min_threshold_fraction, floor.min_cohort, floor.max_clip,
            floor.min_noise_multiplier, floor.allow_offload) == (True, 0.6, 5, 2.0, 0.5, False)
    default = load_profile(ROOT / "firmware-configs" / "x86-gateway.toml").privacy.floor
    assert (default.secure_aggregation, default.max_clip, default.allow_offload) == (False, 0.0, True)


def _minimal_profile(tmp_path: Path, allow_offload: bool) -> Path:
    """rpi4 held in ``minimal`` (any CPU load is too much), telemetry ticks every 0.5 s, and the floor's
    ``allow_offload``."""
    text = (ROOT / "firmware-configs" / "rpi4.toml").read_text()
    for key, value in {"full_max_cpu_percent": 1.0, "hybrid_max_cpu_percent": 2.0, "hysteresis_percent": 0.5,
                       "interval_s": 0.5}.items():
        text = re.sub(rf"^{key} = [^ \n]*", f"{key} = {value}", text, flags=re.M)
    path = tmp_path / f"rpi4-minimal-{allow_offload}.toml"
    path.write_text(text + f"\n[privacy.floor]\nallow_offload = {str(allow_offload).lower()}\n")
    return path


def _ingest(tmp_path: Path, offload_url: str, allow_offload: bool, rows: np.ndarray) -> tuple[int | None, dict]:
    """Run the agent daemon in ``minimal`` with ``--offload offload_url``; once its policy has been applied,
    post ``rows`` to its record endpoint. The answer's model version, and the answer."""
    import json
    import socket
    import threading
    import urllib.request

    from hyprstream.agent.daemon import Agent, AgentConfig, IngestConfig, OffloadLink
    from hyprstream.agent.handoff import read_policy
    from hyprstream.agent.monitor import TraceMonitor, load_trace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp_path.mkdir()
    (tmp_path / "offload.token").write_text("agent-token\n")
    profile = _minimal_profile(tmp_path, allow_offload)
    cfg = AgentConfig(profile_path=profile, profile=load_profile(profile), fleet="plant-7", device_id="pi-03",
                      store_dir=tmp_path / "store", state_dir=tmp_path / "state", store_key=bytes(range(32)),
                      offload=OffloadLink(offload_url, tmp_path / "offload.token"),
                      ingest=IngestConfig(listen_port=port))
    trace = load_trace(ROOT / "tests" / "agent" / "traces" / "cpu_saturated.csv")
    agent = Agent(cfg, monitor=TraceMonitor(trace * 50))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        first = None
        while first is None or read_policy(cfg.state_dir).time <= first:  # a tick after the first: applied
            state = read_policy(cfg.state_dir) if (cfg.state_dir / "policy.json").exists() else None
            if first is None and state is not None:
                assert state.strategy is Strategy.MINIMAL
                first = state.time
            assert runner.is_alive()
            time.sleep(0.1)
        token = (cfg.state_dir / "ingest.token").read_text().strip()
        body = json.dumps([{"features": [float(v) for v in row]} for row in rows]).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/records", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    return answer["model_version"], answer


def test_a_device_whose_floor_forbids_offload_sends_no_rows_to_the_fog(tmp_path):
    """In ``minimal`` the daemon offloads inference to the fog's endpoint (real core, real endpoint on
    loopback); with ``allow_offload = false`` the same daemon sends it nothing."""
    from privacy_helpers import start_core

    from hyprstream.coreapi.client import CoreClient
    from hyprstream.fog.offload import ModelSource, OffloadServer

    task = get_task("digits")
    _, test = task.load_reference_data(seed=0)
    core = start_core(tmp_path / "core")
    client = CoreClient(core.location, "fog-token")
    server = OffloadServer(ModelSource(client, core.model, task, refresh_s=0.0), ("agent-token",)).start()
    try:
        version, answer = _ingest(tmp_path / "allowed", server.url, True, test.x[:5])
        assert version == 0 and len(answer["predictions"]) == 5  # the fog answered
        assert server.counts()["requests"] == 1
        version, answer = _ingest(tmp_path / "forbidden", server.url, False, test.x[:5])
        assert answer["accepted"] == 5 and version is None and answer["predictions"] == []  # no local model yet
        assert server.counts()["requests"] == 1  # nothing more reached the fog
    finally:
        server.stop()
        client.close()
        core.close()
