"""`hyprstream deploy poc`: a whole federation on this host from one command, a round that commits a scored
version, every tier's /metrics and /healthz answered, and `--stop` leaving no process behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from browser import CHROMIUM, Page, dom, screenshot
from hyprstream import poc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.mqtt, pytest.mark.timeout(900),
              pytest.mark.skipif(not all(shutil.which(t) or shutil.which(t, path="/usr/sbin")
                                         for t in ("mosquitto", "mosquitto_passwd", "ssh-keygen")),
                                 reason="needs mosquitto and ssh-keygen")]


def hyprstream(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyprstream.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def get(url: str, token_file: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"} if token_file else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return r.status, r.read().decode()


def test_deploy_poc_stands_up_a_federation_that_trains_and_stops_it(tmp_path):
    root = tmp_path / "poc"
    try:
        up = hyprstream("deploy", "poc", "--dir", root, "--fogs", "1", "--agents", "2", "--local-steps", "5")
        assert up.returncode == 0, up.stderr[-3000:]
        assert "Watch it train:" in up.stdout and "hyprstream deploy poc --stop" in up.stdout
        state = json.loads((root / poc.STATE).read_text())
        kinds = sorted(p["kind"] for p in state["processes"])
        assert kinds == ["agent", "agent", "broker", "core", "dashboard", "fog"]
        ends = state["endpoints"]
        watch = ["--core", ends["core"], "--ca", ends["ca"], "--token-file", ends["reader_token"]]

        # a round commits a version, scored at core on its validation rows
        deadline, lineage = time.monotonic() + 420, []
        while time.monotonic() < deadline:
            listed = hyprstream("core", "versions", poc.MODEL, *watch, "--format", "json", timeout=60)
            assert listed.returncode == 0, listed.stderr
            lineage = json.loads(listed.stdout)
            if len(lineage) >= 2:
                break
            time.sleep(3)
        assert len(lineage) >= 2, (lineage, (root / "fog-1/state/fog.log").read_text()[-2000:])
        assert lineage[1]["fog"] == "fog-1" and lineage[1]["accuracy"] is not None
        # ... and scored on the agents' held-out data (federated evaluation), recorded in its lineage entry
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not lineage[1].get("federated"):
            time.sleep(3)
            lineage = json.loads(hyprstream("core", "versions", poc.MODEL, *watch, "--format", "json").stdout)
        assert lineage[1]["federated"]["fog-1"]["devices"] == 2, (root / "fog-1/state/fog.log").read_text()[-2000:]
        assert 0.0 <= lineage[1]["federated"]["fog-1"]["accuracy"] <= 1.0
        # every tier's metrics and health
        assert "hyprstream_core_model_version" in get(ends["core_metrics"])[1]
        assert get(ends["core_metrics"].replace("/metrics", "/healthz"))[0] == 200
        fog = ends["fog-1"]
        assert "hyprstream_fog_rounds_total" in get(fog["metrics"])[1]
        for agent in fog["agents"].values():
            assert "hyprstream_agent_records_ingested_total" in get(agent["api"] + "/metrics", agent["token"])[1]
            assert get(agent["api"] + "/healthz", agent["token"]) == (200, "ok\n")
        # the dashboard, as its operator opens it: in a real browser, its numbers those of core's API
        reader = Path(ends["reader_token"]).read_text().strip()
        deadline, view = time.monotonic() + 120, {}
        while time.monotonic() < deadline:  # until both agents' telemetry arrived
            view = json.loads(get(ends["dashboard"] + "api/state", ends["reader_token"])[1])
            if len(view["fleets"][0]["devices"]) == 2:
                break
            time.sleep(2)
        assert [d["device_id"] for d in view["fleets"][0]["devices"]] == ["device-1-1", "device-1-2"], view
        if CHROMIUM is not None:
            page = Page(dom(f"{ends['dashboard']}#token={reader}"))
            screenshot(f"{ends['dashboard']}#token={reader}", tmp_path / "poc-dashboard.png")
            lineage = json.loads(hyprstream("core", "versions", poc.MODEL, *watch, "--format", "json").stdout)
            shown = page.rows_with("data-version")
            for v in lineage[-15:]:
                if str(v["version"]) in shown:  # the page may be a version behind the listing
                    assert float(shown[str(v["version"])]["accuracy"]) == v["accuracy"]
                    assert int(shown[str(v["version"])]["participants"]) == v["participants"]
            assert set(page.rows_with("data-device")) == {"device-1-1", "device-1-2"}
            auditor = Path(ends["auditor_token"]).read_text().strip()
            assert Page(dom(f"{ends['dashboard']}#token={auditor}")).ids["audit-verified"]["data-ok"] == "true"
        pids = [p["pid"] for p in state["processes"]]
        family = [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
        assert family  # the fog's SuperLink and ServerApp, the agents' SuperNodes and executors
    finally:
        stopped = hyprstream("deploy", "poc", "--stop", "--dir", root)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("hyprstream poc: stopped 6 process(es): dashboard, device-1-1, device-1-2, "
                                     "fog-1, core, mosquitto")
    assert not [pid for pid in pids + family if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not (root / poc.STATE).exists()
    again = hyprstream("deploy", "poc", "--stop", "--dir", root)
    assert again.returncode == 2 and "no federation here" in again.stderr


@pytest.mark.unit
def test_the_poc_device_profile_is_valid(tmp_path):
    from hyprstream.agent.profile import load_profile

    (tmp_path / "profile.toml").write_text(poc.PROFILE)
    assert load_profile(tmp_path / "profile.toml").device_class == "poc"
