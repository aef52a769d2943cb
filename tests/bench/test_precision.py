"""bf16 as a CPU mode of the bench: which precisions a run measures, the CPU's bf16 support, what the kernels ran
on (read from oneDNN's and MKL's own verbose output), and the fp32 baseline a bf16 run is measured against."""

from __future__ import annotations

import json

import pytest
import torch

from pumer_lightning.bench import Options, build_task, get_experiment, make_batch, run_bench
from pumer_lightning.bench.precision import (
    cpu_bf16,
    kernel_report,
    kernels_line,
    parse_verbose,
    run_precisions,
    token_agreement,
)
from pumer_lightning.measure import speedup

CPU = torch.device("cpu")
XEON = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2"}  # the flags of an Intel Xeon with AMX
EPYC = {"avx2", "fma", "avx"}  # a CPU without bf16 matrix instructions
SUPPORTED = cpu_bf16()["supported"]


def _info(supported: bool) -> dict:
    return {"supported": supported, "cpu_flags": [], "onednn_bf16": supported, "torch_cpu_capability": "AVX2"}


def test_auto_measures_bf16_after_fp32_where_the_cpu_has_bf16_matrix_instructions(capsys):
    assert run_precisions("auto", "auto", CPU, _info(True)) == ["fp32", "bf16-true"]
    assert run_precisions("auto", "off", CPU, _info(True)) == ["fp32"]
    assert run_precisions("auto", "auto", torch.device("cuda"), _info(True)) == ["fp16"]
    assert run_precisions("fp32", "auto", CPU, _info(True)) == ["fp32"]
    assert capsys.readouterr().err == ""


def test_a_cpu_without_bf16_gets_a_message_not_a_slow_fallback(capsys):
    assert run_precisions("auto", "auto", CPU, _info(False)) == ["fp32"]
    err = capsys.readouterr().err
    assert "bf16 rows skipped" in err and "no bf16 matrix instructions" in err and "--cpu-bf16 on" in err
    assert run_precisions("bf16-true", "auto", CPU, _info(False)) == [
        "bf16-true"
    ]  # asked for: run, but say so
    assert "WARNING: --precision bf16-true: this CPU" in capsys.readouterr().err
    assert run_precisions("bf16-true", "auto", CPU, _info(True)) == ["bf16-true"]
    assert capsys.readouterr().err == ""
    assert run_precisions("auto", "on", CPU, _info(False)) == ["fp32", "bf16-true"]


def test_bf16_support_comes_from_the_cpu_flags():
    xeon, epyc = cpu_bf16(XEON), cpu_bf16(EPYC)
    assert (
        xeon["cpu_flags"] == ["avx512_bf16", "amx_bf16", "amx_tile"]
        and xeon["supported"] == xeon["onednn_bf16"]
    )
    assert epyc == {**epyc, "supported": False, "cpu_flags": []}
    assert cpu_bf16(XEON)["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_verbose_lines_give_the_isa_and_every_primitive_that_ran():
    lines = [  # as oneDNN 3.12 and oneMKL 2024 print them on the Xeon this was written on
        "onednn_verbose,v1,info,cpu,isa:Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support",
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0 "
        "wei:bf16::blocked:ba::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,64x768:768x3072,15.1",
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0 "
        "wei:bf16::blocked:ba::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,64x768:768x768,3.2",
        "onednn_verbose,v1,primitive,warning,ukernel,Scratchpad is not cache-line aligned,brgemm.cpp:207",
        "onednn_verbose,v1,ukernel,exec,cpu,brgemm,,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 "
        "dst:f32::blocked:ab::f0,,bs:1 beta:0,32x64:64x185,0.005",
        "MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) Advanced "
        "Vector Extensions 512 (Intel(R) AVX-512) with support for INT8, BF16, FP16 (limited) instructions, and "
        "Intel(R) Advanced Matrix Extensions (Intel(R) AMX) with INT8 and BF16, Lnx 2.10GHz lp64 gnu_thread",
        "MKL_VERBOSE SGEMM(T,N,3072,64,768,0x1,0x2,768,0x3,768,0x4,0x5,3072) 32.00ms CNR:OFF Dyn:1 TID:0  NThr:2",
        "a line of the program's own output",
    ]
    report = parse_verbose(lines)
    assert report["onednn_isa"] == "Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support"
    assert report["onednn"] == {"matmul brg_matmul:avx10_1_512_amx bf16": 2, "ukernel brgemm bf16": 1}
    assert report["mkl"] == {"SGEMM": 1} and report["mkl_isa"].startswith("oneMKL 2024.0")
    line = kernels_line(report)
    assert (
        "oneDNN brg_matmul:avx10_1_512_amx bf16 x2" in line
        and "MKL SGEMM x1 (MKL dispatch: AVX-512, AMX)" in line
    )


@pytest.mark.skipif(not SUPPORTED, reason="the CPU has no bf16 matrix instructions")
def test_a_bf16_matmul_is_reported_on_the_cpus_bf16_kernels():
    x, w = torch.randn(64, 256).bfloat16(), torch.randn(512, 256).bfloat16()
    report = kernel_report(lambda: torch.nn.functional.linear(x, w))
    bf16 = [k for k in report["onednn"] if k.startswith("matmul ") and k.endswith(" bf16")]
    assert bf16 and all(("amx" in k or "bf16" in k.split(" ")[1]) for k in bf16), report["onednn"]
    assert report["onednn_isa"]


def test_an_fp32_matmul_is_reported_as_its_library_call():
    x, w = torch.randn(64, 256), torch.randn(512, 256)
    report = kernel_report(lambda: torch.nn.functional.linear(x, w))
    ran = sum(report["mkl"].values()) + sum(v for k, v in report["onednn"].items() if k.startswith("matmul"))
    assert ran >= 1, report


def test_bench_measures_bf16_beside_fp32_against_the_fp32_baseline(tmp_path):
    # --cpu-bf16 on: the same two runs on any CPU (emulated where there are no bf16 instructions)
    quick = dict(
        rounds=2, train_rounds=1, warmup=0, threads=1, kernel_count="none", verbose=False, plot=False
    )
    options = Options(tiny=True, settings=["pumer"], keep_sweep=(), cpu_bf16="on", out_dir=tmp_path, **quick)
    fp32, bf16 = run_bench(["vilt_nlvr2"], options)
    assert (fp32["name"], bf16["name"]) == ("tiny_vilt_nlvr2_cpu_b8", "tiny_vilt_nlvr2_cpu-bf16-true_b8")
    assert "fp32_reference" not in fp32 and fp32["protocol"]["train_precision"] == "fp32"
    assert bf16["protocol"]["precision"] == "bf16-true" and bf16["protocol"]["train_precision"] == "bf16"
    ref = bf16["fp32_reference"]
    base, pumer = bf16["settings"]
    rates = {"ref": ref["examples_per_s_rounds"], "base": base["examples_per_s_rounds"]}
    times = {k: [bf16["batch_size"] / r for r in v] for k, v in rates.items()}
    assert ref["baseline_speedup"] == pytest.approx(speedup(times, "ref", "base"))
    assert pumer["speedup_vs_fp32_baseline"] == pytest.approx(pumer["examples_per_s"] / ref["examples_per_s"])
    assert base["train_speedup_vs_fp32_baseline"] == pytest.approx(ref["train_baseline_speedup"], rel=1e-6)
    # bf16 autocast keeps half-size activations for backward: less training memory than fp32
    assert ref["train_activation_ratio"] < 1 and pumer["train_activation_ratio_vs_fp32_baseline"] < 1
    # what the matmuls ran on is recorded for both runs, and named in the header
    assert (
        set(bf16["hardware"]["kernels"]) == {"baseline", "pumer"}
        and bf16["hardware"]["bf16"]["cpu_flags"] is not None
    )
    if SUPPORTED:
        assert (
            "bf16" in bf16["hardware"]["kernels_summary"] and "oneDNN" in bf16["hardware"]["kernels_summary"]
        )
    (steps,) = ref["token_agreement"].values()  # the released setting, one entry per reduction step
    assert len(steps) == 2 and all(0 <= s["kept_agreement"] <= 1 for s in steps)
    saved = json.loads((tmp_path / "tiny_vilt_nlvr2_cpu-bf16-true_b8.json").read_text())
    assert saved["fp32_reference"] == ref
    md = (tmp_path / "tiny_vilt_nlvr2_cpu-bf16-true_b8.md").read_text()
    assert "bf16-true against fp32" in md and f"**{ref['baseline_speedup']:.2f}x**" in md
    assert "Same answers (`pumer`" in md


def test_token_agreement_is_one_for_the_same_model_and_less_for_a_different_one():
    exp = get_experiment("meter_nlvr2", tiny=True)
    model = build_task(exp)
    inputs = make_batch(exp, model.backbone, 4)
    same = token_agreement(model, model, exp.released, inputs, inputs)
    assert len(same) == len(exp.released.layers)
    assert all(
        s == {"kept_agreement": 1.0, "merged_pairs_shared": 1.0, "text_maps_equal": True} for s in same
    )
    other = build_task(exp, seed=1)  # other weights: other tokens kept
    differ = token_agreement(other, model, exp.released, inputs, inputs)
    assert min(s["kept_agreement"] for s in differ) < 1.0


def test_one_name_for_two_precisions_is_refused(tmp_path):
    options = Options(tiny=True, cpu_bf16="on", name="x", out_dir=tmp_path, verbose=False, plot=False)
    with pytest.raises(ValueError, match="--name names one output.*fp32, bf16-true"):
        run_bench(["vilt_nlvr2"], options)
