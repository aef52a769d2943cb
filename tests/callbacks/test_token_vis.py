"""Pictures of kept / pruned / merged patches and merged words; per-layer timing hooks."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from pumer_test_utils import run_args

from pumer_lightning.callbacks import TokenStatsCallback, reduction_panel, text_groups
from pumer_lightning.callbacks.token_vis import TokenVisCallback, text_markdown
from pumer_lightning.cli import PumerCLI


def test_reduction_panel_darkens_pruned_and_colours_merged_groups():
    image = np.full((40, 40, 3), 200, dtype=np.uint8)  # 2 x 2 grid of 20 px patches
    # patch 0 kept alone, patch 1 pruned, patches 2 and 3 merged into token 5
    patch_map = torch.tensor([0, 1, -1, 5, 5])
    out = reduction_panel(image, patch_map, grid=2)
    kept, pruned = out[5:15, 5:15], out[5:15, 25:35]
    merged_a, merged_b = out[25:35, 5:15], out[25:35, 25:35]
    assert (kept == 200).all()
    assert pruned.mean() < 60
    assert not (merged_a == 200).all() and np.array_equal(merged_a, merged_b)


def test_text_groups_follow_the_text_map():
    tokens = ["[CLS]", "the", "left", "image", "[SEP]", "[PAD]"]
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    text_map = torch.tensor([0, 1, 1, 2, 3, -1])  # "the" and "left" merged; the pad dropped
    groups = text_groups(tokens, text_map, mask)
    assert groups == [["[CLS]"], ["the", "left"], ["image"], ["[SEP]"]]
    assert text_markdown(groups) == "[CLS] **[the + left]** image [SEP]"
    assert text_groups(tokens, None, mask) == [[t] for t in tokens[:5]]


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
def test_layer_time_and_pictures_for_every_layer(preset, shapes, tmp_path):
    stats = TokenStatsCallback(layer_time=True, flops=False)
    vis = TokenVisCallback(num_examples=2, save_png=True)
    cli = PumerCLI(args=run_args("snli_ve", preset, shapes, tmp_path, "--trainer.fast_dev_run=1"), run=False)
    cli.trainer.callbacks.extend([stats, vis])
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    times = [stats.last[f"val/time/layer_{i:02d}_ms"] for i in range(cli.model.backbone.num_layers)]
    assert all(t > 0 for t in times)
    assert (
        not cli.model.backbone.encoder.layer[0].layernorm_before._forward_pre_hooks
        if preset == "vilt_tiny"
        else True
    )
    pictures = vis.draw(cli.trainer, cli.model)
    assert len(pictures) == 2
    steps = len(cli.model.backbone.reducer.plan(37, 16))
    assert pictures[0].shape[1] > (1 + steps) * 96  # one panel per reduction step after the input


def test_visualisation_is_skipped_without_reduction(shapes, tmp_path):
    cli = PumerCLI(
        args=run_args("snli_ve", "vilt_tiny", shapes, tmp_path, "--trainer.fast_dev_run=1", layers="[]"),
        run=False,
    )
    vis = TokenVisCallback()
    cli.trainer.callbacks.append(vis)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert vis.draw(cli.trainer, cli.model) == []


def test_flops_per_example_shrink_with_reduction(shapes, tmp_path):
    gflops = {}
    for layers in ("[]", "[1,2]"):
        stats = TokenStatsCallback()
        cli = PumerCLI(args=run_args("snli_ve", "vilt_tiny", shapes, tmp_path, layers=layers), run=False)
        trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[stats], limit_val_batches=1,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.validate(cli.model, datamodule=cli.datamodule)
        gflops[layers] = stats.last["val/gflops_per_example"]
    assert 0 < gflops["[1,2]"] < gflops["[]"]
