import urllib.error
import urllib.request

import pytest

from hyprstream.fog.aggregator import FogRound
from hyprstream.fog.metrics import FogMetrics, MetricsServer

pytestmark = pytest.mark.integration


def fog_round(version, participants, refused=0):
    return FogRound(fog="fog-a", round=1, base_version=4, version=version, layers=("fc",), participants=participants,
                    declined=1, refused=refused, failed=0, bytes_up=1000, bytes_down=3000, train_loss=0.5,
                    seconds=2.5)


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()


def samples(text: str) -> dict[tuple[str, str], float]:
    """(sample name, fog label) -> value, parsed by prometheus_client (the exposition format is checked too)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, s.labels["fog"]): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_and_health_over_http():
    metrics = FogMetrics('fog-"a"')
    metrics.record(fog_round(5, 3), outbox=0)
    metrics.record(fog_round(None, 2, refused=1), outbox=1)
    server = MetricsServer(metrics, "127.0.0.1", 0, token="scrape-secret").start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            get(f"{base}/metrics")
        assert info.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            get(f"{base}/metrics", token="wrong")
        status, text = get(f"{base}/metrics", token="scrape-secret")
        assert status == 200
        got = samples(text)
        fog = 'fog-"a"'  # label values are escaped in the text and read back as they were
        assert got[("hyprstream_fog_rounds_total", fog)] == 2
        assert got[("hyprstream_fog_pushes_total", fog)] == 1
        assert got[("hyprstream_fog_participants_total", fog)] == 5
        assert got[("hyprstream_fog_refused_total", fog)] == 1
        assert got[("hyprstream_fog_bytes_down_total", fog)] == 6000
        assert got[("hyprstream_fog_outbox_pushes", fog)] == 1
        assert got[("hyprstream_fog_master_version", fog)] == 4  # nothing pushed: the base
        assert "# TYPE hyprstream_fog_rounds_total counter" in text
        # full precision: a Unix time keeps its fraction of a second (the old "%g" wrote 1.79619e+09)
        stamp = got[("hyprstream_fog_last_progress_timestamp_seconds", fog)]
        assert stamp == metrics.snapshot()["hyprstream_fog_last_progress_timestamp_seconds"] and stamp % 1
        assert get(f"{base}/healthz", token="scrape-secret") == (200, "ok\n")
        assert get(f"{base}/readyz", token="scrape-secret") == (200, "ok\n")
        server.stale_after_s = 1e-9
        with pytest.raises(urllib.error.HTTPError) as info:
            get(f"{base}/healthz", token="scrape-secret")
        assert info.value.code == 503
    finally:
        server.stop()


def test_client_level_privacy_gauges_appear_only_with_client_dp():
    metrics = FogMetrics("fog-a")
    metrics.record(fog_round(5, 3), outbox=0)
    assert "privacy" not in metrics.render() and metrics.privacy() is None
    metrics.record_privacy(4.73, float("inf"), 1e-5)
    text = metrics.render()
    got = samples(text)
    assert got[("hyprstream_fog_privacy_epsilon", "fog-a")] == 4.73
    assert 'hyprstream_fog_privacy_epsilon_budget{fog="fog-a"} +Inf' in text  # unlimited: Prometheus' +Inf
    assert got[("hyprstream_fog_privacy_delta", "fog-a")] == 1e-5
    assert "# TYPE hyprstream_fog_privacy_epsilon gauge" in text
    metrics.record_privacy(7.08, 10.0, 1e-5)
    assert metrics.privacy() == {"epsilon": 7.08, "epsilon_budget": 10.0, "delta": 1e-5}


@pytest.mark.unit
def test_the_endpoint_is_on_by_default_on_loopback_and_port_0_turns_it_off(tmp_path):
    from hyprstream.fog.config import load_fog_config

    (tmp_path / "t").write_text("token\n")
    base = (f'kind = "fog"\nname = "f"\n[core]\nlocation = "grpc://127.0.0.1:1"\ntoken_file = "{tmp_path / "t"}"\n'
            'model = "m"\n')
    (tmp_path / "a.toml").write_text(base)
    (tmp_path / "b.toml").write_text(base + "[metrics]\nport = 0\n")
    default = load_fog_config(tmp_path / "a.toml").metrics
    assert (default.host, default.port) == ("127.0.0.1", 9466)
    assert load_fog_config(tmp_path / "b.toml").metrics.port == 0
