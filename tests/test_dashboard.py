"""The fleet dashboard in a real browser (headless Chromium) against a live core on loopback: what each role's
page shows matches core's API number for number, the audit log verifies (and a tampered one does not),
device fields are text and never markup, and the data endpoint wants a token core accepts."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from browser import CHROMIUM, Page, dom, screenshot
from hyprstream.agent.profile import Strategy
from hyprstream.core import signing, tokens
from hyprstream.core.audit import AuditLog, iter_entries
from hyprstream.core.auth import Authenticator, Role
from hyprstream.core.evaluation import EvaluationSection, Evaluator, Guard
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.core.storage import LocalStorage
from hyprstream.coreapi.client import CoreClient
from hyprstream.dashboard import Dashboard, DashboardServer
from hyprstream.errors import AuthError, ConfigError
from hyprstream.fog.fleet import FleetView
from hyprstream.learning.task import get_task
from hyprstream.learning.trainer import model_weights
from hyprstream.store import to_table
from hyprstream.telemetry.records import DeviceState, status_topic, telemetry_topic, to_wire
from hyprstream.vector_clock import VectorClock

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's chromium package)")]

TOKEN_KEY, AUDIT_KEY = signing.generate_key(), signing.generate_key()
TASK = get_task("digits")
EVIL = '<img src=x onerror="document.title=\'owned\'"><script>document.title="owned"</script>'


def token(sub: str, role: Role) -> str:
    return tokens.issue(TOKEN_KEY, sub, role, ttl_s=3600, now=time.time())[0]


def fleet_telemetry():
    sys.path.insert(0, str(Path(__file__).parent / "fog"))
    import fleet_helpers  # telemetry records as agents send them

    return fleet_helpers


class Federation:
    """Core with an evaluation and six pushes from two fogs, a fleet of four devices, the dashboard."""

    def __init__(self, root) -> None:
        _, test = TASK.load_reference_data(0)
        with pa.OSFile(str(root / "validation.arrow"), "wb") as f, \
                pa.ipc.new_file(f, TASK.to_table(test).schema) as writer:
            writer.write_table(TASK.to_table(test))
        self.audit_path = root / "audit.jsonl"
        self.audit = AuditLog(self.audit_path, AUDIT_KEY, sync=False)
        evaluator = Evaluator("digits", EvaluationSection("digits", str(root / "validation.arrow"), Guard.KEEP))
        repo = ModelRepository(LocalStorage(root / "models", sync=False), audit=self.audit,
                               evaluators={"digits": evaluator})
        self.core = CoreFlightServer(repo, Authenticator(None, [TOKEN_KEY.public_key()]))
        self.location = self.core.start_background()
        w0 = model_weights(TASK.build_model(seed=0))
        rng = np.random.default_rng(0)
        with CoreClient(self.location, token("admin", Role.ADMIN)) as admin:
            admin.register_model("digits", to_table(w0, layer=TASK.layer_of))
            for i in range(6):
                fog = ("fog-a", "fog-b")[i % 2]
                layers = {"head"} if i % 3 else {"fc1", "head"}
                delta = {k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in w0.items()
                         if TASK.layer_of(k) in layers}
                clocks = {k: VectorClock.of(c) for k, c in admin.head("digits")["clocks"].items()}
                admin.push_delta("digits", to_table(delta, layer=TASK.layer_of), fog=fog, seq=i // 2 + 1,
                                 base_clocks={k: clocks[k] for k in layers}, participants=2 + i)
            # two fogs' federated evaluations of version 2: together 0.76 over their 4 devices
            admin.report_evaluation("digits", 2, fog="fog-b", loss=0.5, accuracy=0.81, devices=3)
            admin.report_evaluation("digits", 2, fog="fog-a", loss=0.7, accuracy=0.61, devices=1)
        helpers = fleet_telemetry()
        self.fleet = FleetView("plant-7")
        devices = [helpers.telemetry("hub-1", battery=15.0, ac=False, strategy=Strategy.HYBRID),
                   helpers.telemetry("hub-2", strategy=Strategy.FULL, spent=9.0),
                   helpers.telemetry("cam-3"),
                   replace(helpers.telemetry("evil-4"), device_class=EVIL)]
        for t in devices:
            assert self.fleet.ingest(telemetry_topic(t.fleet, t.device_id), to_wire(t))
        offline = helpers.status("cam-3", DeviceState.OFFLINE)
        assert self.fleet.ingest(status_topic(offline.fleet, offline.device_id), to_wire(offline))
        self.dashboard = DashboardServer(Dashboard(self.location, fleets=[self.fleet],
                                                   audit_key=AUDIT_KEY.public_key())).start()

    def page(self, tok: str | None) -> str:
        return self.dashboard.url + (f"#token={tok}" if tok else "")

    def close(self) -> None:
        self.dashboard.stop()
        self.core.stop()
        self.audit.close()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Federation(tmp_path_factory.mktemp("dashboard"))
    yield f
    f.close()


def test_the_readers_page_shows_versions_layers_and_devices_as_core_and_the_fleet_report_them(fed, tmp_path):
    reader = token("ops", Role.READER)
    before = fed.audit.last_seq
    page = Page(dom(fed.page(reader)))
    shot = screenshot(fed.page(reader), tmp_path / "dashboard-reader.png")
    with CoreClient(fed.location, reader) as api:
        lineage, head = api.list_versions("digits"), api.head("digits")
    assert ("body", {"data-loaded": "true"}) in page.tags
    shown = page.rows_with("data-version")
    assert sorted(map(int, shown)) == [v["version"] for v in lineage] == list(range(7))
    for v in lineage:
        row = shown[str(v["version"])]
        assert int(row["participants"]) == v["participants"] and float(row["accuracy"]) == v["accuracy"]
        assert float(row["loss"]) == v["loss"] and row["fog"] == (v["fog"] or "")
        assert row["bytes"] == ("" if v["update_bytes"] is None else str(v["update_bytes"]))
        assert row["layers"] == ",".join(v["layers"]) and float(row["created"]) == v["created"]
    assert all(v["update_bytes"] > 0 for v in lineage[1:])  # what a push carried, in the lineage
    assert float(shown["2"]["federated"]) == pytest.approx(0.76) and shown["3"]["federated"] == ""
    layers = page.rows_with("data-layer")
    assert {k: json.loads(r["clock"]) for k, r in layers.items()} == head["clocks"]
    assert layers["fc1"]["last_changed"] == "4" and layers["head"]["last_changed"] == "6"
    devices = page.rows_with("data-device")
    assert sorted(devices) == ["cam-3", "evil-4", "hub-1", "hub-2"]
    assert [devices[d]["online"] for d in ("cam-3", "hub-1")] == ["false", "true"]
    assert (devices["hub-1"]["strategy"], devices["hub-1"]["battery"]) == ("hybrid", "15")
    assert (devices["hub-2"]["budget_spent"], devices["hub-1"]["budget_spent"]) == ("true", "false")
    assert "role 'reader' may not read the audit log" in "".join(page.text)
    # the reader's visits asked core nothing its role may not: no refusal in the audit log
    assert not [e for e in iter_entries(fed.audit_path) if e.seq > before and e.outcome != "ok"]
    assert shot.stat().st_size > 10_000


def test_the_auditors_page_verifies_the_log_and_shows_its_newest_entries(fed, tmp_path):
    auditor = token("audit", Role.AUDITOR)
    page = Page(dom(fed.page(auditor)))
    screenshot(fed.page(auditor), tmp_path / "dashboard-auditor.png")
    assert page.ids["audit-verified"]["data-ok"] == "true"
    seqs = [int(s) for s in page.rows_with("data-seq")]
    entries = {e.seq: e for e in iter_entries(fed.audit_path)}
    assert seqs == list(range(seqs[0], seqs[0] - min(25, seqs[0]), -1)) and seqs[0] <= max(entries)
    for row in page.rows_with("data-seq").values():
        e = entries[int(row["seq"])]
        assert (row["actor"], row["action"], row["subject"], row["outcome"]) == (e.actor, e.action, e.subject,
                                                                                  e.outcome)
    assert not page.rows_with("data-version") and "role 'auditor' may not read models" in "".join(page.text)


def test_device_fields_are_shown_as_text_never_as_markup(fed):
    page = Page(dom(fed.page(token("ops", Role.READER))))
    assert not [a for tag, a in page.tags if tag == "img" or (tag == "script" and a.get("src") != "app.js")]
    assert EVIL in "".join(page.text)  # the device's class as it sent it, as text
    assert "owned" not in [t.strip() for t in page.text]
    assert ("title", {}) in page.tags and "Hyprstream fleet" in page.text


def test_without_a_token_the_page_asks_for_one(fed):
    page = Page(dom(fed.page(None)))
    assert ("body", {"data-loaded": "login"}) in page.tags and not page.rows_with("data-version")


def test_the_data_endpoint_wants_a_token_core_accepts_and_the_page_sends_safe_headers(fed):
    url = fed.dashboard.url + "api/state"

    def get(headers=None):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    assert get()[0] == 401
    forged = tokens.issue(signing.generate_key(), "ops", Role.ADMIN, ttl_s=60, now=time.time())[0]
    status, _, body = get({"Authorization": f"Bearer {forged}"})
    assert status == 401 and "signature" in body["error"]
    status, headers, body = get({"Authorization": f"Bearer {token('ops', Role.READER)}"})
    assert status == 200 and body["models"][0]["version"] == 6 and "denied" in body["audit"]
    assert headers["Content-Security-Policy"].startswith("default-src 'self'") and headers["X-Frame-Options"] == "DENY"
    with urllib.request.urlopen(fed.dashboard.url, timeout=30) as r:
        html = r.read().decode()
    assert "<script>" not in html and '<script src="app.js"' in html  # no inline script: the CSP holds
    dead = DashboardServer(Dashboard("grpc://127.0.0.1:1", timeout_s=5)).start()  # core unreachable
    try:
        request = urllib.request.Request(dead.url + "api/state", headers={"Authorization": f"Bearer {forged}"})
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(request, timeout=30)
        assert answered.value.code == 502 and "core unreachable" in json.loads(answered.value.read())["error"]
    finally:
        dead.stop()
    with pytest.raises(ConfigError, match="only over HTTPS"):
        DashboardServer(Dashboard(fed.location), "0.0.0.0")


def test_a_tampered_audit_log_does_not_verify(fed):
    auditor = token("audit", Role.AUDITOR)
    offset = fed.audit_path.read_bytes().index(b'"fog-b"')

    def write(text: bytes) -> None:
        with open(fed.audit_path, "r+b") as f:
            f.seek(offset)
            f.write(text)

    write(b'"fog-x"')  # one entry's fog renamed in place, same length: its hash no longer holds
    try:
        audit = Dashboard(fed.location, audit_key=AUDIT_KEY.public_key()).state(auditor)["audit"]
    finally:
        write(b'"fog-b"')
    assert audit["verified"] is False and "hash mismatch" in audit["reason"]
    assert Dashboard(fed.location, audit_key=AUDIT_KEY.public_key()).state(auditor)["audit"]["verified"]
    with pytest.raises(AuthError):
        Dashboard(fed.location).state(token("x", Role.AUDITOR) + "x")


def test_the_command_line_refuses_incomplete_settings_with_the_reason(capsys):
    from hyprstream.cli import main

    assert main(["dashboard", "--core", "grpc://127.0.0.1:1", "--fleet", "plant-7"]) == 2
    assert "--fleet needs --mqtt" in capsys.readouterr().err
    assert main(["dashboard", "--core", "grpc://127.0.0.1:1", "--tls-cert", "x.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["dashboard", "--core", "grpc://127.0.0.1:1", "--listen", "0.0.0.0:0"]) == 2
    assert "only over HTTPS" in capsys.readouterr().err
