"""Lightning's model summary shows the model's real FLOPs (before: ``Total FLOPs: 0``).

Every task module has an ``example_input_array`` (one example at the backbone's image size and text length), so
Lightning's `ModelSummary` forwards it; its total must equal what the project's own counter
(`pumer_lightning.measure.count_flops`, which also counts the CPU fused attention kernel) finds for that input.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary, get_human_readable_count
from reliability_helpers import cli_fit_args

from pumer_lightning.cli import PumerCLI
from pumer_lightning.measure import count_flops
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tasks import (
    BackboneSpec,
    NLVR2Task,
    PretrainTask,
    RetrievalTask,
    SNLIVETask,
    VQATask,
)

REDUCER = ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2)


def _own_count(task) -> int:
    task.eval()
    with torch.no_grad():
        return count_flops(lambda: task(*task.example_input_array))


@pytest.mark.parametrize(
    ("cls", "preset"),
    [
        (SNLIVETask, "vilt_tiny"),
        (NLVR2Task, "vilt_tiny"),
        (VQATask, "meter_tiny"),
        (RetrievalTask, "vilt_tiny"),
        (PretrainTask, "vilt_tiny"),
    ],
)
def test_the_summary_counts_the_flops_of_the_example_input(cls, preset, shapes_snli):
    tokenizer = str(shapes_snli[1]) if preset.startswith("vilt") else None
    reducer = REDUCER if preset.startswith("vilt") else ReducerSchedule(layers=[1], keep_ratio=0.7)
    task = cls(backbone=BackboneSpec(preset, tokenizer=tokenizer), reducer=reducer)
    batch, eager = task.example_input_array
    assert eager is False  # a replayed CUDA graph would count nothing
    assert batch["pixel_values"].shape[-1] == task.backbone.image_size
    summary = ModelSummary(task, max_depth=1)
    assert summary.total_flops > 0
    assert summary.total_flops == _own_count(task)
    layers = dict(zip(summary.layer_names, summary.flop_counts.values()))
    assert sum(layers["backbone"].values()) > 0  # the backbone's row has its share too


def test_the_summary_counts_the_reduced_forward(shapes_snli):
    """The configured reducer is part of the count: fewer FLOPs than the same model without it, and NLVR2's two
    images cost twice one image's backbone passes."""
    spec = BackboneSpec("vilt_tiny", tokenizer=str(shapes_snli[1]))
    full = ModelSummary(SNLIVETask(backbone=spec), max_depth=1).total_flops
    reduced = ModelSummary(SNLIVETask(backbone=spec, reducer=REDUCER), max_depth=1).total_flops
    assert 0 < reduced < full
    two = ModelSummary(NLVR2Task(backbone=spec), max_depth=1).flop_counts["backbone"]
    one = ModelSummary(SNLIVETask(backbone=spec), max_depth=1).flop_counts["backbone"]
    assert sum(two.values()) == 2 * sum(one.values()) > 0


def test_a_fit_prints_the_real_total(shapes_snli, tmp_path, capfd):
    args = ["fit", *cli_fit_args(shapes_snli, tmp_path)[4:], "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1"]  # fmt: skip
    cli = PumerCLI(args=args)
    out = capfd.readouterr()
    (line,) = [ln for ln in (out.out + out.err).splitlines() if "Total FLOPs" in ln]
    expected = _own_count(cli.model)
    assert expected > 0 and line.split(":")[1].strip() == get_human_readable_count(expected), line
