"""What every benchmark records about the machine it ran on (no torch import, for the streams benchmark)."""
from __future__ import annotations


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"
