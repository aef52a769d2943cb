"""Measuring instruments: FLOPs, peak memory, reducer time, timers, and the machine's description.

* **FLOPs** come from `torch.utils.flop_counter.FlopCounterMode` (matmul, conv and attention; 2 FLOPs per
  multiply-add; softmax, norms, activations, gathers and top-k are not counted). Its registry has no formula for
  the CPU fused attention kernel ``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU every SDPA call
  would count 0 FLOPs (docs/bench.md#flops); `SDPA_FLOP_MAPPING` adds torch's own SDPA formula
  (QK^T + AV) for it. `count_flops` also lists any matmul-like or attention op that ran without a formula, so a
  new kernel cannot silently drop out of the count.
* **Peak memory on CPU** (`TensorMemoryTracker`): a dispatch mode that sees every tensor an op creates during
  the forward and follows its storage until it is freed (a weak reference per storage). The peak of live bytes
  plus the bytes alive before the forward (weights, buffers, inputs) is the CPU analogue of CUDA's
  ``max_memory_allocated``: bytes held by tensors, without allocator caching or fragmentation, and without
  scratch space a kernel allocates internally. It is exact and noise-free, unlike the resident set size,
  which includes the allocator's retained free memory and the interpreter.
* **Peak memory on CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* **Reducer time** (`ReducerTimer`): wraps the two calls a backbone makes at a reduce layer, its
  ``_reduction_inputs`` (importance scores and similarity metrics) and ``reduce`` (pruning, image merging, text
  merging), with a timer each: ``perf_counter`` on CPU, CUDA events on GPU (no synchronisation added).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_FLOP_MAPPING: dict = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
"""Formulas `FlopCounterMode` lacks (torch 2.13): the CPU fused SDPA kernel."""

_FLOP_HEAVY = re.compile(r"mm|matmul|conv|attention|einsum|linear|addbmm|baddbmm")


class _OpRecorder(TorchDispatchMode):
    """Records the ops that actually run (after `FlopCounterMode`'s decompositions)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


@contextmanager
def count_flops():
    """Count the FLOPs of the code in the block.

    Yields a dict filled on exit with ``total`` (FLOPs), ``by_module`` (FLOPs per module name, as
    `FlopCounterMode` attributes them) and ``uncounted_ops`` (matmul-like or attention ops that ran with no
    formula: their FLOPs are missing from ``total``; it should be empty).
    """
    result: dict = {}
    recorder = _OpRecorder()
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_MAPPING)
    with recorder, counter:  # the counter is innermost: the recorder sees the ops it lets through
        yield result
    result["total"] = int(counter.get_total_flops())
    result["by_module"] = {
        name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items() if name != "Global"
    }
    result["uncounted_ops"] = sorted(
        str(op)
        for op in recorder.ops
        if op not in counter.flop_registry and _FLOP_HEAVY.search(str(op)) and "backward" not in str(op)
    )


# ---- memory -----------------------------------------------------------------------------------------------------
def _storage_bytes(tensors: Iterable[Tensor]) -> tuple[set[int], int]:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return seen, total


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storage during the code it wraps (any device; meant for CPU).

    Args:
        static: tensors alive before the block (weights, buffers, inputs). Their storages count once in
            ``static_bytes`` and are never counted again when an op returns a view of them.
    Attributes:
        static_bytes: bytes of the static storages.
        peak_new_bytes: peak bytes of storages created inside the block and alive at the same time.
        peak_bytes: ``static_bytes + peak_new_bytes``.
    """

    def __init__(self, static: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._static, self.static_bytes = _storage_bytes(static)
        self._live: dict[int, int] = {}
        self.current_new_bytes = 0
        self.peak_new_bytes = 0

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.peak_new_bytes

    def _freed(self, ptr: int) -> None:
        self.current_new_bytes -= self._live.pop(ptr, 0)

    def _track(self, t: Tensor) -> None:
        if t.is_meta or not hasattr(t, "untyped_storage"):
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not ptr or not nbytes or ptr in self._live or ptr in self._static:
            return
        self._live[ptr] = nbytes
        self.current_new_bytes += nbytes
        self.peak_new_bytes = max(self.peak_new_bytes, self.current_new_bytes)
        weakref.finalize(storage, self._freed, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out


# ---- reducer time -----------------------------------------------------------------------------------------------
class ReducerTimer:
    """Accumulates the time a backbone spends in its reducer calls while installed (``with timer:``).

    The wrapped calls are the backbone's ``_reduction_inputs`` method and the ``reduce`` function its module
    calls. ``available`` is False (and nothing is timed) when the backbone has neither, e.g. after a refactor.
    Call `start` before a timed sample and `elapsed` after the device is synchronised.
    """

    def __init__(self, backbone: torch.nn.Module, device: torch.device, label: str | None = None) -> None:
        self.backbone = backbone
        self.label = label  # also open a `torch.profiler.record_function` range of this name per call
        self.cuda = device.type == "cuda"
        self.module = sys.modules[type(backbone).__module__]
        self.available = hasattr(self.module, "reduce") and hasattr(backbone, "_reduction_inputs")
        self.calls = 0
        self._cpu_seconds = 0.0
        self._events: list = []
        self._saved: Callable | None = None

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.label is not None:
                with torch.profiler.record_function(self.label):
                    return measured(*args, **kwargs)
            return measured(*args, **kwargs)

        def measured(*args, **kwargs):
            self.calls += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._cpu_seconds += time.perf_counter() - t0
            return out

        return timed

    def __enter__(self) -> ReducerTimer:
        if self.available:
            self._saved = self.module.reduce
            self.module.reduce = self._wrap(self._saved)
            self.backbone._reduction_inputs = self._wrap(
                type(self.backbone)._reduction_inputs.__get__(self.backbone)
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.available and self._saved is not None:
            self.module.reduce = self._saved
            del self.backbone._reduction_inputs
            self._saved = None

    def start(self) -> None:
        self.calls = 0
        self._cpu_seconds = 0.0
        self._events = []

    def elapsed(self) -> float:
        """Seconds spent in reducer calls since `start` (the device must be synchronised first)."""
        if self.cuda:
            return sum(s.elapsed_time(e) for s, e in self._events) / 1e3
        return self._cpu_seconds


# ---- device, timing ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``fp16``/``bf16``; a no-op context for ``fp32``."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device.type, dtype=dtype)


# ---- machine description ----------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(
                    f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}
                )
    except OSError:
        pass
    return []


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "pumer_lightning"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def machine_info(device: torch.device) -> dict:
    """Hardware and software versions, for the JSON."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    hardware = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_bytes": _mem_total(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware.update(
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
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "pumer_lightning": _version("pumer-lightning"),
        "git_commit": _git_commit(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "openmp": torch.backends.openmp.is_available(),
    }
    return {"hardware": hardware, "software": software}
