"""What every benchmark records about the machine it ran on.

`machine()` imports no torch (the streams benchmark stays torch-free); `torch_machine()` adds what only
torch can say. Versions are read from the installed distributions, so they match requirements.lock's
spelling and cost no import.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

# The /proc/cpuinfo flags that decide which kernels torch and oneDNN can use (AVX2 / AVX-512 / AMX paths).
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
# The distributions whose versions move the benchmark figures.
VERSIONED = ("torch", "transformers", "deepspeed", "ray", "kafka-python", "mlflow")


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def _field(lines: list[str], name: str) -> str | None:
    """The value of the first `name : value` line, or None."""
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def version(dist: str) -> str:
    """The installed version of distribution `dist`, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """CPU model and kernel flags, CPU counts, Python and library versions, without importing torch."""
    lines = _cpuinfo()
    flags = set((_field(lines, "flags") or "").split())
    return {
        "cpu": _field(lines, "model name") or "unknown",
        "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
        # Logical CPUs in the machine, then the ones this process may run on (a container or taskset
        # can pin it to fewer): thread counts and timings follow the second.
        "logical_cpus": sum(line.startswith("processor") for line in lines) or None,
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": {dist: version(dist) for dist in VERSIONED},
    }


def torch_machine() -> dict[str, Any]:
    """`machine()` plus torch's intra-op threads, the CUDA its wheel was built for (None for a CPU wheel;
    the lock's version leaves it out) and the CUDA device, for benchmarks that run torch."""
    import torch  # here, not at the top: the streams benchmark imports this module without torch

    return {**machine(), "torch_threads": torch.get_num_threads(), "torch_cuda": torch.version.cuda,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
