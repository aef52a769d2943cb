"""`pumer_lightning.lab.context` and `pumer_lightning.lab.machine`: device, precision, experiment files and the
one machine description."""

from __future__ import annotations

import re

import pytest
import torch

from pumer_lightning.lab.context import (
    autocast,
    experiment_files,
    resolve_device,
    train_precision,
    weight_dtype,
)
from pumer_lightning.lab.machine import DIRTY, machine_info, short_commit


def test_resolve_device_names_the_flag_and_what_it_expected():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit, match=r"--device 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(SystemExit, match=r"--where 'gpu!': expected auto"):
        resolve_device("gpu!", flag="--where")
    if not torch.cuda.is_available():
        with pytest.raises(
            SystemExit, match=r"--device cuda: no CUDA device is available here \(use --device cpu\)"
        ):
            resolve_device("cuda")


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("bf16-mixed", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("16-mixed", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_the_autocast_map_covers_lightning_and_bench_names(precision, dtype):
    cpu = torch.device("cpu")
    with autocast(cpu, precision):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    assert weight_dtype(precision) == torch.float32


@pytest.mark.parametrize("precision", ["32-true", "fp32", "bf16-true", "fp16-true", "16-true"])
def test_full_and_half_weight_precisions_run_without_autocast(precision):
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast(torch.device("cpu"), precision):
        assert not torch.is_autocast_enabled("cpu")
    half = {"bf16-true": torch.bfloat16, "fp16-true": torch.float16, "16-true": torch.float16}
    assert weight_dtype(precision) == half.get(precision, torch.float32)
    assert (
        train_precision(torch.device("cpu")) == "32-true"
        and train_precision(torch.device("cuda")) == "bf16-mixed"
    )


def test_experiment_files_compose_base_and_the_experiment_or_list_the_known_ones(tmp_path):
    (tmp_path / "base.yaml").write_text("{}\n")
    (tmp_path / "demo.yaml").write_text("{}\n")
    files = experiment_files("demo", tmp_path)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["base.yaml", "demo.yaml"]
    with pytest.raises(
        SystemExit, match=r"error: unknown experiment 'nope': .*nope.yaml does not exist\. Available: demo"
    ):
        experiment_files("nope", tmp_path)


def test_machine_info_is_a_superset_of_what_the_reports_read():
    info = machine_info(torch.device("cpu"))
    hw, sw = info["hardware"], info["software"]
    # the bench's hardware line and results, the study's header, the tuner's environment
    for key in (
        "device",
        "name",
        "cpu",
        "cpu_flags",
        "logical_cpus",
        "cpus_available",
        "threads",
        "torch_threads",
        "torch_interop_threads",
        "memory_bytes",
    ):
        assert key in hw
    for key in (
        "python",
        "platform",
        "torch",
        "transformers",
        "numpy",
        "git_commit",
        "mkl",
        "mkldnn",
        "openmp",
    ):
        assert key in sw
    assert (
        hw["device"] == "cpu"
        and hw["threads"] == torch.get_num_threads()
        and sw["torch"] == torch.__version__
    )
    assert sw["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", sw["git_commit"])


def test_short_commit_says_when_the_code_had_uncommitted_changes():
    assert short_commit("0123456789abcdef" * 2 + "01234567") == "0123456"
    assert short_commit("0123456789" * 4 + DIRTY) == "0123456 (with uncommitted changes)"
    assert short_commit(None) == "unknown"
