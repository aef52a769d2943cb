"""bf16 on a CPU: which precisions a run measures, whether the CPU has bf16 matrix instructions, which kernels the
matmuls ran on, and the fp32 baseline a CPU half-precision run measures itself against.

* `run_precisions`: ``--precision auto`` on a CPU measures fp32 and then, when the CPU has bf16 matrix
  instructions (``avx512_bf16`` or ``amx_bf16``, or Arm's ``bf16``), ``bf16-true``; without them the bench says so
  and why (bf16 would be emulated, slower than fp32) instead of running a slow fallback. ``--cpu-bf16`` overrides;
  an explicit bf16 ``--precision`` there runs with a warning.
* `cpu_bf16`: the flags, torch's CPU capability and oneDNN's bf16 support, for the JSON's ``hardware``.
* `kernel_report`: one forward under oneDNN's and MKL's verbose modes, their output on file descriptor 1 read
  back: the ISA each library dispatched to (``isa:Intel AVX10.1 and Intel AMX ...``) and how often each primitive
  ran (``matmul brg_matmul:avx10_1_512_amx bf16``), so a results file names what the kernels used, not just the
  flags.
* The fp32 reference (`probe_reference` here, its fields in `results`, its section in `report`): a bf16 run times
  the fp32 baseline in the same interleaved rounds and training rounds, so the bf16-over-fp32 ratio comes from one
  run; `token_agreement` says whether bf16 keeps and merges the tokens fp32 does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pumer_lightning.lab.machine import cpu_model

from .measure import peak_memory

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""/proc/cpuinfo flags of bf16 matrix instructions: x86's AVX512-BF16 and AMX-BF16, Arm's BF16 (``Features``)."""


# ---- which precisions ---------------------------------------------------------------------------------------------
def _cpuinfo_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16(flags: set[str] | None = None) -> dict:
    """Whether this CPU has bf16 matrix instructions (``supported``), from its /proc/cpuinfo ``flags`` (read when
    None), with torch's CPU capability and whether oneDNN takes bf16 matmuls here at all."""
    flags = _cpuinfo_flags() if flags is None else flags
    present = [f for f in (*BF16_FLAGS, "amx_tile") if f in flags]
    onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {
        "supported": any(f in flags for f in BF16_FLAGS) and onednn,
        "cpu_flags": present,
        "onednn_bf16": onednn,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def no_bf16_message(info: dict) -> str:
    """Why the bench measures no bf16 rows on this CPU."""
    return (
        f"this CPU ({cpu_model()}) has no bf16 matrix instructions (none of {', '.join(BF16_FLAGS)} in "
        f"/proc/cpuinfo; torch's CPU capability: {info['torch_cpu_capability']}): bf16 matmuls would be emulated, "
        "slower than fp32"
    )


def run_precisions(
    precision: str, cpu_bf16_choice: str, device: torch.device, info: dict | None = None
) -> list[str]:
    """The precisions one bench run measures, in order (``precision`` and ``cpu_bf16_choice`` as the options say).

    ``auto``: fp16 autocast on CUDA; on a CPU fp32, then ``bf16-true`` (``--cpu-bf16 auto``: when the CPU has bf16
    matrix instructions, else a message on stderr says why not; ``on`` always; ``off`` never). An explicit bf16
    precision on a CPU without them runs, with a warning that it measures an emulation.
    """
    if device.type != "cpu":
        return ["fp16" if precision == "auto" else precision]
    if precision == "auto" and cpu_bf16_choice == "off":
        return ["fp32"]
    if precision != "auto" and not precision.startswith("bf16"):
        return [precision]
    info = cpu_bf16() if info is None else info
    if precision == "auto":
        if info["supported"] or cpu_bf16_choice == "on":
            return ["fp32", "bf16-true"]
        print(
            f"bf16 rows skipped: {no_bf16_message(info)}; --cpu-bf16 on measures them anyway", file=sys.stderr
        )
        return ["fp32"]
    if not info["supported"]:
        print(
            f"WARNING: --precision {precision}: {no_bf16_message(info)}; these figures measure that",
            file=sys.stderr,
        )
    return [precision]


# ---- which kernels ------------------------------------------------------------------------------------------------
_KERNEL_INFO: dict[
    str, str
] = {}  # oneDNN and MKL print their ISA once per process: kept from the first capture
_SRC_DTYPE = re.compile(r"src:(\w+?):")
_MKL_ISA = re.compile(r"\(Intel\(R\) ([\w-]+)\)")  # "(Intel(R) AVX-512)" in MKL's banner


@contextlib.contextmanager
def _fd1_lines() -> Iterator[list[str]]:
    """The lines written to file descriptor 1 inside the block (where oneDNN and MKL print their verbose output)."""
    lines: list[str] = []
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            yield lines
        finally:
            with contextlib.suppress(OSError, AttributeError):  # C's stdout buffer, where a library printf'd
                ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def parse_verbose(lines: list[str]) -> dict:
    """oneDNN and MKL verbose lines -> ``onednn_isa``, ``mkl_isa`` (None when not printed), ``onednn`` (count of
    each executed primitive as ``kind implementation src-dtype``; oneDNN's ukernels, such as the CPU flash attention's
    brgemm, as ``ukernel kind src-dtype``) and ``mkl`` (count of each MKL call, e.g. ``SGEMM``)."""
    onednn: Counter[str] = Counter()
    mkl: Counter[str] = Counter()
    isa = {"onednn_isa": None, "mkl_isa": None}
    for line in lines:
        if line.startswith("MKL_VERBOSE"):
            rest = line.removeprefix("MKL_VERBOSE").strip()
            if "(" in rest.split(" ", 1)[0]:
                mkl[rest.split("(", 1)[0]] += 1
            elif "oneMKL" in rest or "Intel(R) MKL" in rest:
                isa["mkl_isa"] = rest
            continue
        fields = line.split(",")
        if not fields[0].endswith("_verbose"):
            continue
        if "info" in fields and any(f.startswith("isa:") for f in fields):
            isa["onednn_isa"] = next(f for f in fields if f.startswith("isa:")).removeprefix("isa:")
        if "exec" in fields:
            at = fields.index("exec")
            kind, impl = fields[at + 2 : at + 4] if len(fields) > at + 3 else ("?", "?")
            src = next((m.group(1) for f in fields[at:] if (m := _SRC_DTYPE.match(f))), "?")
            name = f"ukernel {kind} {src}" if "ukernel" in fields[:at] else f"{kind} {impl} {src}"
            onednn[name] += 1
    return {**isa, "onednn": dict(onednn.most_common()), "mkl": dict(mkl.most_common())}


def kernel_report(run: Callable[[], object]) -> dict:
    """What the kernels of one call of ``run`` used: `parse_verbose` of the oneDNN and MKL verbose output it
    prints (the ISAs are remembered from the first capture of the process, as both libraries print them once)."""
    with _fd1_lines() as lines:
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
    report = parse_verbose(lines)
    for key in ("onednn_isa", "mkl_isa"):
        if report[key]:
            _KERNEL_INFO[key] = report[key]
        report[key] = _KERNEL_INFO.get(key)
    return report


def kernels_line(report: dict | None) -> str:
    """One line naming what the matmuls ran on: oneDNN's implementation (and ISA) or MKL's calls (and ISA)."""
    if not report:
        return "kernels not recorded"
    matmuls = {k: v for k, v in report["onednn"].items() if k.split(" ", 1)[0] in ("matmul", "inner_product")}
    parts = []
    if matmuls:
        names = ", ".join(f"{k.split(' ', 1)[1]} x{v}" for k, v in matmuls.items())
        parts.append(f"matmuls on oneDNN {names} (ISA: {report.get('onednn_isa') or '?'})")
    if report["mkl"]:
        names = ", ".join(f"{k} x{v}" for k, v in report["mkl"].items())
        isa = ", ".join(_MKL_ISA.findall(report.get("mkl_isa") or "")) or "?"
        parts.append(f"MKL {names} (MKL dispatch: {isa})")
    return "; ".join(parts) or "no oneDNN or MKL matmul seen"


# ---- the fp32 reference -------------------------------------------------------------------------------------------
def probe_reference(model: torch.nn.Module, inputs, run: Callable[[], object]) -> dict:
    """One fp32 baseline forward under the memory instrument (CPU): ``probe_s`` (sizes the timed rounds) and
    ``memory`` (peak and activation bytes, as the settings' probes)."""
    static = [*model.parameters(), *model.buffers(), *inputs.values()]
    t0 = time.perf_counter()
    with torch.inference_mode(), peak_memory(torch.device("cpu"), static) as memory:
        run()
    return {"probe_s": time.perf_counter() - t0, "memory": memory}


def token_agreement(
    model: torch.nn.Module, fp32_model: torch.nn.Module, schedule, inputs, fp32_inputs
) -> list[dict]:
    """Same answers? The tokens the half-precision ``model`` and ``fp32_model`` keep and merge under ``schedule``, per
    reduction step of the first backbone pass: ``kept_agreement`` (share of the original image tokens both keep or
    both prune), ``merged_pairs_shared`` (share of the fp32 model's merged pairs of original image tokens, two of them
    in one token, that the other model merges too; None without merging), ``text_maps_equal``."""
    maps = []
    for m, x in ((model, inputs), (fp32_model, fp32_inputs)):
        with torch.inference_mode(), m.backbone.using(schedule):
            images = x["pixel_values"][:, 0]
            out = m.backbone(images, x["input_ids"], x["attention_mask"], track_maps=True)
        maps.append(out.trace)
    steps = []
    for half, full, text_half, text_full in zip(
        maps[0].patch_maps, maps[1].patch_maps, maps[0].text_maps, maps[1].text_maps
    ):
        kept_half, kept_full = half >= 0, full >= 0
        together_full = (full[:, :, None] == full[:, None, :]) & kept_full[:, :, None]
        together_half = (half[:, :, None] == half[:, None, :]) & kept_half[:, :, None]
        eye = torch.eye(full.shape[1], dtype=torch.bool, device=full.device)
        pairs = (together_full & ~eye).sum().item()
        steps.append(
            {
                "kept_agreement": (kept_half == kept_full).float().mean().item(),
                "merged_pairs_shared": (together_full & together_half & ~eye).sum().item() / pairs
                if pairs
                else None,
                "text_maps_equal": bool(torch.equal(text_half, text_full)),
            }
        )
    return steps
