"""`lfm-bench sustained`: minutes of decoding measured per window beside what the OS says about heat; sensors
read from a simulated sysfs tree (this VM exposes none), the phones' thermal status through mock platform APIs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from shared_bundles import demo_bundle

from lfm_edge.device_bench import sustained
from lfm_edge.device_bench.cli import main
from lfm_edge.runtime.backends import java, objc
from lfm_edge.runtime.backends.python import LfmSession


def _sysfs(root: Path) -> tuple[Path, Path]:
    """A phone's sysfs as far as the benchmark reads it: two thermal zones (one unreadable) and two CPUs."""
    thermal, cpus = root / "thermal", root / "cpu"
    for n, (kind, temp) in enumerate((("cpu-big", "48500"), ("battery", "31200"), ("gpu", "busy"))):
        zone = thermal / f"thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    for n, khz in enumerate(("1804800", "2841600")):
        (cpus / f"cpu{n}" / "cpufreq").mkdir(parents=True)
        (cpus / f"cpu{n}" / "cpufreq" / "scaling_cur_freq").write_text(khz)
    (cpus / "cpufreq").mkdir()  # not a CPU
    return thermal, cpus


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return LfmSession(demo_bundle(tmp_path_factory.getbasetemp(), "int4"), threads=1)


def test_sensors_read_zones_and_frequencies_and_name_what_is_missing(tmp_path):
    thermal, cpus = _sysfs(tmp_path)
    assert sustained.thermal_zones(thermal) == {"cpu-big:0": 48.5, "battery:1": 31.2}  # "busy" is skipped
    assert sustained.cpu_frequencies(cpus) == {"cpu0": 1804.8, "cpu1": 2841.6}
    empty = sustained.Sensors(tmp_path / "none", tmp_path / "none", lambda: None).read()
    assert empty == {"temperatures_c": None, "cpu_mhz": None, "platform_thermal_status": None}
    missing = sustained.Sensors.missing([empty])
    assert len(missing) == 3 and "thermal zones" in missing[0]
    assert sustained.Sensors.missing([empty, sustained.Sensors(thermal, cpus, lambda: "light").read()]) == []


def test_a_short_run_records_each_window_and_the_first_and_last_speeds(session, tmp_path):
    thermal, cpus = _sysfs(tmp_path)
    seen = []
    result = sustained.run(session, 1.2, window=0.25, turn_tokens=16, prompt_tokens=8,
                           sensors=sustained.Sensors(thermal, cpus, lambda: "light"),
                           progress=lambda f, m: seen.append(f))
    windows, summary = result["windows"], result["summary"]
    assert len(windows) >= 4 and seen == sorted(seen) and seen[-1] == 1.0
    assert all(w["decode_tps"] > 0 and w["temperatures_c"]["cpu-big:0"] == 48.5 for w in windows)
    assert all(w["platform_thermal_status"] == "light" and w["anonymous_mb"] > 0 for w in windows)
    assert summary["decoded_tokens"] == sum(w["tokens"] for w in windows) == len(result["steps"])
    assert summary["turns"] >= summary["decoded_tokens"] // 16 and summary["edge_s"] == pytest.approx(
        summary["duration_s"] / 2, abs=0.1)
    assert summary["last_over_first"] == pytest.approx(summary["last_tps"] / summary["first_tps"])
    assert summary["hottest_c"] == 48.5 and summary["missing_sensors"] == []


@pytest.mark.slow
def test_the_command_writes_its_reports_and_says_what_is_missing_here(tmp_path, tmp_path_factory, capsys):
    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "int4")
    assert main(["sustained", str(bundle), "--minutes", "0.03", "--window", "0.5", "--turn-tokens", "8",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["workload"] == "sustained" and result["summary"]["first_tps"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    for w in result["windows"]:  # a sensor is there with readings, or missing: never a zero
        assert w["temperatures_c"] is None or all(v != 0 for v in w["temperatures_c"].values())
    assert ("thermal zones" in capsys.readouterr().out) == (result["windows"][0]["temperatures_c"] is None)
    assert main(["sustained", str(bundle), "--minutes", "0"]) == 2


def test_thermal_status_through_mock_android_and_ios_apis(monkeypatch):
    """A mock stands in for the phones' APIs (no JVM with Android's classes or iOS here): the words the
    backends return for the platform's levels."""
    power = SimpleNamespace(getCurrentThermalStatus=lambda: 3)
    activity = SimpleNamespace(getSystemService=lambda name: power if name == "power" else None)
    jnius = SimpleNamespace(autoclass=lambda name: SimpleNamespace(POWER_SERVICE="power"),
                            cast=lambda cls, obj: obj)
    monkeypatch.setitem(sys.modules, "jnius", jnius)
    assert java.thermal_status(activity) == "severe"
    info = SimpleNamespace(thermalState=lambda: 2)
    pyobjus = SimpleNamespace(autoclass=lambda name: SimpleNamespace(processInfo=lambda: info))
    monkeypatch.setitem(sys.modules, "pyobjus", pyobjus)
    assert objc.thermal_status() == "serious"


def test_the_apps_sustained_workload_reports_first_and_last_speeds(session, tmp_path):
    from lfm_edge.mobile_app.app import bench

    seen = []
    report = bench.run_sustained(tmp_path / "demo", session, minutes=0.02, progress=lambda d, t, m: seen.append(d))
    assert seen[-1] == 1000 and report.threads == 1
    assert report.headline().startswith("Sustained: last ") and "x the first" in report.headline()
    rows = dict(report.rows())
    assert rows["Decoded"].endswith("turns)") and rows["Overall decode"].endswith("tok/s")
    if report.summary["missing_sensors"]:  # this VM: said in words, and the rows say "not exposed", not 0
        assert report.missing_text().startswith("Not exposed on this device (missing, not zero)")
        assert "not exposed" in (rows["Hottest thermal zone"], rows["Thermal status (last)"])
