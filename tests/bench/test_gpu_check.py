"""`scripts/gpu_check.sh` and its summary: runs end to end on the tiny presets without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pumer_lightning.bench import Options, run_bench
from pumer_lightning.bench.gpu_check import is_user_path, main, mode_of

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out: Path, batches: list[int], **kw) -> list[dict]:
    options = Options(
        tiny=True, settings=["pumer"], keep_sweep=(), batch_sizes=batches, rounds=1, train=False, warmup=0,
        threads=1, kernel_count="none", out_dir=out, verbose=False, plot=False, **{"cpu_bf16": "off", **kw},
    )  # fmt: skip
    return run_bench(["vilt_nlvr2"], options)


def test_summary_joins_sweeps_and_lists_every_run(tmp_path):
    first = _run(tmp_path, [2, 4])
    _run(tmp_path, [1])  # a later call adds a batch size to the same mode
    _run(tmp_path, [2], precision="bf16-true", op_count=False)  # runs (with a warning) on any CPU
    (tmp_path / "stages.tsv").write_text("users\tok\t12\nsweep\tskipped (budget of 420 s spent)\t0\n")
    main([str(tmp_path), "--no-plot"])
    summary = (tmp_path / "summary.md").read_text()
    data = json.loads((tmp_path / "summary.json").read_text())
    assert len(data["runs"]) == 4 and {r["batch"] for r in data["runs"]} == {1, 2, 4}
    impl = first[0]["protocol"]["reducer_impl"] or "n/a"  # the backbone's default reduction step
    assert {r["mode"] for r in data["runs"]} == {f"fp32, reducer {impl}", f"bf16-true, reducer {impl}"}
    sweep = json.loads((tmp_path / "tiny_vilt_nlvr2_cpu_batch_sweep.json").read_text())
    assert sweep["batch_sizes"] == [1, 2, 4]  # joined across the two calls
    assert not (tmp_path / "tiny_vilt_nlvr2_cpu-bf16-true_batch_sweep.json").exists()  # one batch size only
    # no run took the path users get on a GPU, so the speed targets are not measured; the reducer share is
    assert [t["met"] for t in data["targets"][:3]] == [None, None, None]
    assert "not measured" in summary and "| sweep | skipped (budget of 420 s spent) | 0 |" in summary
    pumer = next(s for s in first[0]["settings"] if s["name"] == "pumer")
    assert f"{pumer['speedup']:.2f}x" in summary
    assert not is_user_path(first[0]) and mode_of(first[0]) == f"fp32, reducer {impl}"


def test_the_script_refuses_a_full_run_without_a_gpu(tmp_path):
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present: the full run would start")
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_TINY": "0", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.slow
def test_the_script_runs_end_to_end_on_the_tiny_presets(tmp_path):
    """GPU_CHECK_TINY=1: every stage on the CPU (CUDA graphs left out), then the summary."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_TINY": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = (tmp_path / "stages.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in stages] == [
        [name, "ok"] for name in ("users", "eager", "compiled", "half", "sweep", "eager128", "sweep_meter")
    ]
    data = json.loads((tmp_path / "summary.json").read_text())
    assert {r["exp"] for r in data["runs"]} == {"tiny_vilt_nlvr2", "tiny_meter_nlvr2"}
    eager = [r for r in data["runs"] if "reducer eager" in r["mode"] and r["batch"] == 32]
    assert all(r["train_activation_mem_bound"] is not None and r["reducer_ops_per_step"] for r in eager)
    assert (tmp_path / "summary.md").exists() and list(tmp_path.glob("*_batch_sweep.png"))


def _row(exp: str, batch: int, mode: str, user_path: bool, speedup: float, share: float | None) -> dict:
    return {
        "file": f"{exp}_{batch}_{mode}.json", "exp": exp, "batch": batch, "mode": mode, "user_path": user_path,
        "speedup": speedup, "reducer_time_share": share,
    }  # fmt: skip


def test_targets_take_the_users_path_and_the_compiled_half_weight_share():
    from pumer_lightning.bench.gpu_check import targets_of

    rows = [
        _row("vilt_nlvr2", 32, "fp16, reducer eager", False, 2.0, 0.30),
        _row("vilt_nlvr2", 32, "fp16-true, CUDA graph, reducer auto", True, 1.7, None),
        _row("vilt_nlvr2", 32, "fp16-true, reducer compiled", False, 1.1, 0.04),
        _row("tiny_meter_nlvr2", 32, "fp16-true, CUDA graph, reducer auto", True, 1.2, 0.08),
    ]
    by_target = {t["target"].split(":")[0]: t for t in targets_of(rows)}
    vilt32 = by_target["vilt_nlvr2 released, batch 32, path users get"]
    assert (vilt32["measured"], vilt32["met"], vilt32["file"]) == (1.7, True, rows[1]["file"])
    assert by_target["vilt_nlvr2 released, batch 128, path users get"]["met"] is None
    meter32 = by_target["meter_nlvr2 released, batch 32, path users get"]
    assert (meter32["measured"], meter32["met"]) == (1.2, False)  # tiny runs count as the experiment
    vilt_share = by_target["vilt_nlvr2 released"]
    assert (vilt_share["measured"], vilt_share["met"]) == (0.04, True)  # compiled step, half weights first
    meter_share = by_target["meter_nlvr2 released"]
    assert (meter_share["measured"], meter_share["met"]) == (0.08, False)  # else any run that measured it
