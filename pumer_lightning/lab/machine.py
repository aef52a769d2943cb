"""The one description of the machine, the software and the commit a figure was measured with.

`machine_info` gives ``{"hardware": ..., "software": ...}`` for a run's JSON record; `short_commit` the commit as a
report prints it. The git commit is read from the repository this package lives in, marked as having
uncommitted changes when the package's files differ from it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

#: The CPU instruction-set flags that decide the speed of matmul and attention kernels.
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
#: Appended to the commit when the package's files differ from it.
DIRTY = "+dirty"


def _cpuinfo(field: str) -> list[str]:
    """Every value of ``field`` in /proc/cpuinfo (one per logical CPU; empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == field and ":" in ln]


def cpu_model() -> str:
    models = _cpuinfo("model name")
    return models[0] if models else platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    flags = _cpuinfo("flags")
    present = set(flags[0].split()) if flags else set()
    return sorted(f for f in present if f in CPU_FLAGS)


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str | None:
    """The full commit hash, with `DIRTY` appended when ``pumer_lightning/`` has uncommitted changes; None outside
    a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + (DIRTY if _git("status", "--porcelain", "--", "pumer_lightning") else "")


def machine_info(device: torch.device) -> dict[str, Any]:
    """Hardware and software of this process on ``device``, for a run's JSON record.

    ``hardware``: ``device`` (its type), ``name`` (the GPU, else the CPU model), ``cpu``, ``cpu_flags``,
    ``logical_cpus``, ``cpus_available``, ``threads`` and ``torch_threads`` (the same), ``torch_interop_threads``,
    ``memory_bytes``, and on CUDA ``gpu``, ``gpu_memory_bytes``, ``gpu_capability``, ``cuda``, ``cudnn``.
    ``software``: ``python``, ``platform``, ``torch``, ``transformers``, ``lightning``, ``numpy``,
    ``pumer_lightning``, ``git_commit`` (`git_commit`), ``mkl``, ``mkldnn``, ``openmp``.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    cpu = cpu_model()
    hardware: dict[str, Any] = {
        "device": device.type,
        "name": cpu,
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": available,
        "threads": torch.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_bytes": memory_bytes(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware.update(
            name=props.name,
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    software = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "lightning": package_version("lightning"),
        "numpy": package_version("numpy"),
        "pumer_lightning": package_version("pumer-lightning"),
        "git_commit": git_commit(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "openmp": torch.backends.openmp.is_available(),
    }
    return {"hardware": hardware, "software": software}


def short_commit(commit: str | None) -> str:
    """``abc1234`` or ``abc1234 (with uncommitted changes)`` for a report; ``unknown`` outside git."""
    if not commit:
        return "unknown"
    dirty = commit.endswith(DIRTY)
    return commit.removesuffix(DIRTY)[:7] + (" (with uncommitted changes)" if dirty else "")
