"""Measuring instruments: FLOPs, peak memory, reducer time, op and kernel counts (the machine's description and the
precision map are the lab layer's: `pumer_lightning.lab.machine`, `pumer_lightning.lab.context`).

* **FLOPs** come from `torch.utils.flop_counter.FlopCounterMode` (matmul, conv and attention; 2 FLOPs per
  multiply-add; softmax, norms, activations, gathers and top-k are not counted). Its registry has no formula for
  the CPU fused attention kernel ``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU every SDPA call
  would count 0 FLOPs (docs/bench.md#flops); `pumer_lightning.measure.SDPA_FLOP_MAPPING` adds torch's own SDPA
  formula (QK^T + AV) for it. `flops_by_module` also lists any matmul-like or attention op that ran without a formula, so a
  new kernel cannot silently drop out of the count.
* **Peak memory on CPU** (`TensorMemoryTracker`): a dispatch mode that sees every tensor an op creates during
  the forward and follows its storage until it is freed (a weak reference per storage). The peak of live bytes
  plus the bytes alive before the forward (weights, buffers, inputs) is the CPU analogue of CUDA's
  ``max_memory_allocated``: bytes held by tensors, without allocator caching or fragmentation, and without
  scratch space a kernel allocates internally. It is exact and noise-free, unlike the resident set size,
  which includes the allocator's retained free memory and the interpreter.
* **Peak memory on CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* **Ops per forward** (`OpCounter`): a dispatch mode counting the aten ops that do work (views, bare
  allocations and ``detach``/``alias`` skipped); on a GPU each is roughly one kernel launch. It also counts the
  ops inside the ``pumer.reduce`` ranges the backbones open around every reduction step.
* **Reducer time** (`reduce_range_profile`): `torch.profiler` time inside those ``pumer.reduce`` ranges
  (nothing is patched, so eager and compiled reduction steps are measured alike): host time on CPU, GPU kernel
  time on CUDA.
* **Compiled reduction step** (`compiled_kernel_count`): inductor's own kernel count
  (``torch._inductor.metrics.generated_kernel_count``) and the kernel and extern calls (``mm``, ``topk``...)
  of the code it generated.
* **Memory kept for backward** (`SavedBytesByPart`): bytes of the tensors autograd saves, by block, from a
  ``saved_tensors_hooks`` pack hook; the base of the training-memory bound.
"""

from __future__ import annotations

import re
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pumer_lightning.measure import flop_counter  # the one FLOP counter (SDPA_FLOP_MAPPING lives there)

aten = torch.ops.aten


# ---- FLOPs ------------------------------------------------------------------------------------------------------
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
def flops_by_module():
    """Count the FLOPs of the code in the block.

    Yields a dict filled on exit with ``total`` (FLOPs), ``by_module`` (FLOPs per module name, as
    `FlopCounterMode` attributes them) and ``uncounted_ops`` (matmul-like or attention ops that ran with no
    formula: their FLOPs are missing from ``total``; it should be empty).
    """
    result: dict = {}
    recorder = _OpRecorder()
    counter = flop_counter()
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


@contextmanager
def peak_memory(device: torch.device, static: Iterable[Tensor] = ()) -> Iterator[dict[str, int]]:
    """Peak memory of the code in the block: yields a dict filled on exit with ``peak_mem_bytes`` and
    ``activation_peak_bytes`` (what the block added, at its peak). CPU: `TensorMemoryTracker` (``static``: the
    tensors alive before, counted in the peak); CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``."""
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_mem_bytes=int(peak), activation_peak_bytes=int(peak - before))
        return
    with TensorMemoryTracker(static) as tracker:
        yield result
    result.update(peak_mem_bytes=tracker.peak_bytes, activation_peak_bytes=tracker.peak_new_bytes)


# ---- op counts ------------------------------------------------------------------------------------------------
REDUCE_RANGE = "pumer.reduce"
"""The `torch.profiler.record_function` range the backbones open around every reduction step."""

NOT_KERNELS = ("aten.empty", "aten.lift_fresh", "aten.detach", "aten.alias")
"""Ops that do no work (bare allocations, autograd bookkeeping); views are skipped through ``is_view``."""

_RANGE_ENTER = "profiler._record_function_enter"
_RANGE_EXIT = "profiler._record_function_exit"


def does_work(func) -> bool:
    """True for an op that launches a kernel on a GPU: not a view, not a bare allocation, not profiler bookkeeping."""
    name = str(func)
    return not (
        getattr(func, "is_view", False) or name.startswith(NOT_KERNELS) or name.startswith("profiler.")
    )


class OpCounter(TorchDispatchMode):
    """Counts the ops that do work (`does_work`) in the code it wraps, and those inside reduction-step ranges.

    On a GPU almost every such op is one kernel launch, so the count taken on the CPU predicts launch overhead.
    Every op is seen once, at the level it is dispatched (a composite op decomposes before it gets here, and the
    ops an op calls internally are not seen). ``record_function`` ranges are dispatched as ``profiler`` ops even
    without a profiler running, so the counter also sees the ``pumer.reduce`` ranges the backbones open and
    counts the ops inside them (``in_range``) and how many ranges were opened (``ranges``).

    Attributes:
        total: ops that do work.
        by_op: ``total`` by op name.
        in_range: ops inside ``range_name`` ranges; ``in_range_by_op`` by op name.
        ranges: ``range_name`` ranges opened.
    """

    def __init__(self, range_name: str = REDUCE_RANGE) -> None:
        super().__init__()
        self.range_name = range_name
        self.total = 0
        self.in_range = 0
        self.ranges = 0
        self.by_op: Counter[str] = Counter()
        self.in_range_by_op: Counter[str] = Counter()
        self._stack: list[str] = []
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(_RANGE_ENTER):
            label = str(args[0]) if args else ""
            self._stack.append(label)
            if label == self.range_name:
                self.ranges += 1
                self._depth += 1
        elif name.startswith(_RANGE_EXIT):
            if self._stack and self._stack.pop() == self.range_name:
                self._depth -= 1
        elif does_work(func):
            key = name.rsplit(".", 1)[0] if name.count(".") >= 2 else name  # aten.mul.Tensor -> aten.mul
            self.total += 1
            self.by_op[key] += 1
            if self._depth > 0:
                self.in_range += 1
                self.in_range_by_op[key] += 1
        return out


def count_ops(run: Callable) -> OpCounter:
    """`OpCounter` of one call of ``run`` under ``torch.inference_mode``."""
    counter = OpCounter()
    with torch.inference_mode(), counter:
        run()
    return counter


# ---- reducer share of time ----------------------------------------------------------------------------------------
def reduce_range_profile(
    run: Callable, device: torch.device, forwards: int = 1, range_name: str = REDUCE_RANGE
) -> dict:
    """Time spent in the backbone's ``pumer.reduce`` ranges over ``forwards`` calls of ``run``, by `torch.profiler`.

    Nothing is patched: the ranges are the ones the backbones open, so an eager and a compiled reduction step are
    measured alike (a compiled region called inside a range has its kernels attributed to it). Returns seconds
    per forward: ``wall_s`` (host wall clock of the profiled forwards), ``range_host_s`` (host time inside the
    ranges, which includes the Python and launch time of the step), on CUDA ``device_s`` (GPU time of every
    kernel of the forward) and ``range_device_s`` (GPU time of the kernels launched inside the ranges), and
    ``ranges`` (ranges per forward); on CUDA also ``launches`` (kernel and graph launches per forward) and
    ``range_launches`` (those inside the ranges). ``share`` is the reducer's share of the forward's time: host time inside
    the ranges / wall time on CPU, GPU time inside the ranges / GPU time of the forward on CUDA; ``host_share``
    is the host-side share on either device. Run it under inference mode and autocast as the timed forwards.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(forwards):
            run()
        synchronize(device)
        wall = time.perf_counter() - t0
    host_events = [e for e in prof.events() if e.device_type == DeviceType.CPU and not e.is_async]
    ranges = [e for e in host_events if e.name == range_name]  # not the GPU-side user annotations
    host = sum(e.cpu_time_total for e in ranges) / 1e6
    out = {
        "forwards": forwards,
        "wall_s": wall / forwards,
        "ranges": len(ranges) / forwards,
        "range_host_s": host / forwards,
        "host_share": host / wall if wall > 0 else None,
    }
    if cuda:
        # kernels are attributed to the host events that launched them: both sums use that attribution
        top = [e for e in host_events if e.cpu_parent is None]
        device_total = sum(e.device_time_total for e in top) / 1e6
        in_ranges = sum(e.device_time_total for e in ranges) / 1e6
        in_range_ids = set()
        for r in ranges:
            stack = list(r.cpu_children)
            while stack:
                e = stack.pop()
                in_range_ids.add(e.id)
                stack.extend(e.cpu_children)
        launches = [e for e in host_events if _is_launch(e.name)]
        out.update(
            device_s=device_total / forwards,
            range_device_s=in_ranges / forwards,
            share=in_ranges / device_total if device_total > 0 else None,
            launches=len(launches) / forwards,
            range_launches=sum(e.id in in_range_ids for e in launches) / forwards,
        )
    else:
        out["share"] = out["host_share"]
    return out


def _is_launch(name: str) -> bool:
    """A CUDA runtime/driver call that launches a kernel or a graph."""
    return name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx") or (
        name in ("cudaGraphLaunch", "cudaLaunchCooperativeKernel")
    )


# ---- compiled reduction step ----------------------------------------------------------------------------------
_CODE_TAIL = re.compile(r"^(?:def get_args|def benchmark_compiled_module|if __name__)", re.M)
_KERNEL_CALL = re.compile(r"^\s+((?:cpp|triton)_\w+?)(?:\.run)?\(", re.M)
_EXTERN_CALL = re.compile(r"\bextern_kernels\.(\w+)\(|\btorch\.ops\.(\w+)\.(\w+)\.\w+\(")


def parse_inductor_code(code: str) -> dict:
    """Kernel and extern calls in one module inductor generated (its ``call`` and any graph partitions).

    Returns ``kernel_calls`` (call sites of generated ``cpp_*``/``triton_*`` kernels; their definitions and the
    module's benchmarking tail do not count) and ``extern_calls`` (op name: call sites of library kernels inductor
    leaves in place, e.g. ``mm``, ``bmm``, ``aten.topk``).
    """
    tail = _CODE_TAIL.search(code)
    body = code[: tail.start()] if tail else code
    kernels = len(_KERNEL_CALL.findall(body))
    externs: Counter[str] = Counter()
    for extern, namespace, op in _EXTERN_CALL.findall(body):
        externs[extern if extern else f"{namespace}.{op}"] += 1
    return {"kernel_calls": kernels, "extern_calls": dict(sorted(externs.items()))}


def compiled_kernel_count(run: Callable) -> dict:
    """What inductor generates for the compiled regions one call of ``run`` compiles.

    Dynamo's caches are cleared and inductor's FX graph cache is off, so every region ``run`` reaches is compiled
    here and counted (call it where only the regions to count are compiled, e.g. the backbone's compiled
    reduction steps, and before anything else compiled in the process is needed again). Returns ``graphs``
    (compiled modules), ``generated_kernels`` (``torch._inductor.metrics.generated_kernel_count``, inductor's own
    count: on CPU it also counts the scalar/vectorised variants of a kernel, so it exceeds the calls),
    ``kernel_calls`` and ``extern_calls`` summed over the graphs (`parse_inductor_code`), and ``compile_s``.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    metrics.reset()
    t0 = time.perf_counter()
    with inductor_config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(run)
    compile_s = time.perf_counter() - t0
    parsed = [parse_inductor_code(code) for code in codes]
    externs: Counter[str] = Counter()
    for p in parsed:
        externs.update(p["extern_calls"])
    return {
        "graphs": len(codes),
        "generated_kernels": int(metrics.generated_kernel_count),
        "kernel_calls": sum(p["kernel_calls"] for p in parsed),
        "extern_calls": dict(sorted(externs.items())),
        "per_graph": parsed,
        "compile_s": compile_s,
    }


# ---- memory kept for backward, by part of the model ---------------------------------------------------------------
class SavedBytesByPart:
    """Bytes of the tensors autograd saves for backward, attributed to the part of the model that saved them.

    A forward pre-hook on every module names the current part (``part_of(module name)``; ops between module
    calls go to the last module entered), and a ``saved_tensors_hooks`` pack hook adds the storage of every saved
    tensor once (weights, inputs and other ``static`` storages are not counted). ``by_part`` maps part to bytes.
    """

    def __init__(
        self, model: torch.nn.Module, part_of: Callable[[str], str], static: Iterable[Tensor] = ()
    ) -> None:
        self.model = model
        self.part_of = part_of
        self._static, _ = _storage_bytes(static)
        self._seen: set[int] = set()
        self.by_part: dict[str, int] = {}
        self.current = part_of("")
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: Tensor) -> Tensor:
        if isinstance(t, Tensor) and not t.is_meta:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self._seen and ptr not in self._static:
                self._seen.add(ptr)
                self.by_part[self.current] = self.by_part.get(self.current, 0) + storage.nbytes()
        return t

    def __enter__(self) -> SavedBytesByPart:
        for name, module in self.model.named_modules():
            part = self.part_of(name)

            def enter(_module, _args, part=part):
                self.current = part

            self._handles.append(module.register_forward_pre_hook(enter))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---- device, timing ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixed_precision(precision: str) -> str:
    """The precision of the training step: a half-weight precision trains as its autocast counterpart over fp32
    weights (``bf16-true`` -> ``bf16``, Lightning's ``bf16-mixed``); the others as they are."""
    return precision.removesuffix("-true")
