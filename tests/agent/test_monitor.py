"""The resource monitor: psutil readings, NVML through a stand-in library, quiet absence, traces."""

from __future__ import annotations

import sys
import types
from collections import namedtuple

import psutil
import pytest

from hyprstream.agent.monitor import (
    GpuSample,
    NvmlGpu,
    ResourceMonitor,
    ResourceSample,
    TraceMonitor,
    load_trace,
    soc_temperature,
    write_trace,
)
from hyprstream.errors import ValidationError

pytestmark = pytest.mark.unit


class NoGpu(NvmlGpu):
    def read(self):
        return None


def test_samples_this_machine(tmp_path):
    mon = ResourceMonitor(tmp_path, gpu=NoGpu(), clock=lambda: 123.0)
    burn = sum(i * i for i in range(200_000))  # some CPU between the priming call and the sample
    s = mon.sample()
    assert burn > 0 and s.time == 123.0
    assert 0 <= s.cpu_percent <= 100 and 0 < s.memory_percent <= 100 and 0 < s.disk_percent <= 100
    vm = psutil.virtual_memory()
    assert abs(s.memory_used_mb - (vm.total - vm.available) / 2**20) < 0.2 * vm.total / 2**20
    assert s.gpu is None


class FakeNvml(types.ModuleType):
    """The pynvml calls the monitor makes, answering like a busy 80 GB card."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, init_fails=False, count=1):
        super().__init__("pynvml")
        self.init_fails, self.count, self.shutdowns = init_fails, count, 0

    def nvmlInit(self):
        if self.init_fails:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h):
        return namedtuple("U", "gpu memory")(73, 20)

    def nvmlDeviceGetMemoryInfo(self, h):
        return namedtuple("M", "total used free")(80 * 2**30, 20 * 2**30, 60 * 2**30)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetPowerUsage(self, h):
        return 312_500  # milliwatts


def test_nvml_readings(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = NvmlGpu()
    assert gpu.available
    assert gpu.read() == GpuSample("NVIDIA H100 80GB HBM3", 73.0, 20 * 1024.0, 80 * 1024.0, 61.0, 312.5)
    gpu.close()
    assert fake.shutdowns == 1


@pytest.mark.parametrize("fake", [FakeNvml(init_fails=True), FakeNvml(count=0), None])
def test_absent_gpu_is_quiet(monkeypatch, caplog, fake):
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # None: "import pynvml" raises ImportError
    caplog.set_level("INFO", logger="hyprstream")
    gpu = NvmlGpu()
    assert gpu.read() is None and not gpu.available
    assert not [r for r in caplog.records if r.levelname != "DEBUG"]


Temp = namedtuple("Temp", "label current high critical")


def test_soc_temperature_prefers_the_soc_sensor():
    sensors = {"nvme": [Temp("", 70.0, None, None)], "cpu_thermal": [Temp("", 51.5, None, None)]}
    assert soc_temperature(sensors) == 51.5
    assert soc_temperature({"coretemp": [Temp("Core 0", 40.0, 0, 0), Temp("Core 1", 44.0, 0, 0)]}) == 44.0
    assert soc_temperature({"weird": [Temp("", 33.0, None, None)]}) == 33.0
    assert soc_temperature({}) is None


def test_trace_round_trip_of_a_real_recording(tmp_path):
    mon = ResourceMonitor(tmp_path, gpu=NoGpu())
    recorded = [mon.sample() for _ in range(3)]
    recorded.append(ResourceSample(9.0, 1.0, 2.0, 3.0, 4.0, 50.5, 77.0, False,
                                   GpuSample("g", 5.0, 6.0, 7.0, None, 8.5)))
    path = tmp_path / "trace.csv"
    assert write_trace(path, recorded) == 4
    assert load_trace(path) == recorded
    replay = TraceMonitor(load_trace(path))
    assert [replay.sample() for _ in range(4)] == recorded
    with pytest.raises(IndexError):
        replay.sample()


def test_bad_traces_name_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,cpu_percent,memory_percent\n0,10,20\n5,250,20\n")
    with pytest.raises(ValidationError, match=r"bad.csv:3: .*cpu_percent must be in \[0, 100\]"):
        load_trace(path)
    path.write_text("time,cpu_percent,memory_percent,fan_rpm\n")
    with pytest.raises(ValidationError, match="unknown \\['fan_rpm'\\]"):
        load_trace(path)
