"""bench/machine_info.py: what every benchmark JSON records about its machine, without importing torch."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A fresh interpreter, as the streams benchmark runs it: this one already has torch (conftest imports it).
PROBE = """
import json, sys
sys.path.insert(0, "bench")
import machine_info
print(json.dumps({"machine": machine_info.machine(), "missing": machine_info.version("spectutor-no-such-dist"),
                  "kernel_flags": machine_info.KERNEL_FLAGS, "versioned": machine_info.VERSIONED,
                  "torch_imported": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_machine_does_not_import_torch(probe: dict) -> None:
    assert probe["torch_imported"] is False


def test_machine_fields(probe: dict) -> None:
    m = probe["machine"]
    assert set(m) == {"cpu", "cpu_flags", "logical_cpus", "os_cpu_count", "affinity_cpus", "python", "versions"}
    assert isinstance(m["cpu"], str) and m["cpu"]
    assert 1 <= m["affinity_cpus"] <= m["os_cpu_count"]
    assert m["python"] == ".".join(map(str, sys.version_info[:3]))


def test_flags_are_the_kernel_flags_cpuinfo_lists(probe: dict) -> None:
    flags = probe["machine"]["cpu_flags"]
    assert set(flags) <= set(probe["kernel_flags"])
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        listed = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                       if line.startswith("flags")), [])
        assert flags == [f for f in probe["kernel_flags"] if f in listed]


def test_versions_are_the_installed_distributions(probe: dict) -> None:
    versions = probe["machine"]["versions"]
    assert list(versions) == probe["versioned"]
    assert all(isinstance(v, str) and v for v in versions.values())
    assert versions["torch"] == metadata.version("torch")
    assert probe["missing"] == "not installed"
