"""The TensorBoard dashboard of a real run, read back from its event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pumer_test_utils import run_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from pumer_lightning.cli import PumerCLI
from pumer_lightning.reduce import ReducerSchedule

RUN = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
       "--trainer.log_every_n_steps=1")  # fmt: skip


def fit(shapes: Path, out: Path, preset: str = "vilt_tiny", *extra: str):
    cli = PumerCLI(args=["fit", *run_args("nlvr2", preset, shapes, out, *RUN, *extra)])
    return cli, Path(cli.trainer.log_dir)


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar(acc: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def vilt_run(shapes, tmp_path_factory):
    return fit(shapes, tmp_path_factory.mktemp("tb_vilt"))


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
def test_event_files_hold_the_dashboard(preset, shapes, tmp_path, vilt_run):
    cli, log_dir = vilt_run if preset == "vilt_tiny" else fit(shapes, tmp_path, preset)
    acc = events(log_dir)
    tags = set(acc.Tags()["scalars"])
    layers = cli.model.backbone.num_layers
    for i in range(layers):
        for modality in ("image", "text"):
            assert f"tokens/{modality}/layer_{i:02d}" in tags
            assert f"val/tokens/{modality}/layer_{i:02d}" in tags
    for tag in ("throughput/train_samples_per_sec", "throughput/train_tokens_per_sec",
                "throughput/val_samples_per_sec", "throughput/val_tokens_per_sec",
                "val/gflops_per_example", "val/tokens/per_pass", "val/acc", "train/loss"):  # fmt: skip
        assert tag in tags, tag
    assert all(v > 0 for v in scalar(acc, "throughput/val_samples_per_sec"))
    assert 0 < scalar(acc, "val/gflops_per_example")[-1] < 1.0  # a tiny model: well under a GFLOP per pair
    # the custom-scalars layout: "Token reduction" with one multi-line chart per modality, and "Throughput"
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    categories = {c.title: c for c in layout.category}
    assert {"Token reduction", "Throughput"} <= set(categories)
    charts = {c.title: list(c.multiline.tag) for c in categories["Token reduction"].chart}
    assert charts["image tokens entering each layer (train)"] == [r"^tokens/image/layer_\d+$"]
    assert charts["text tokens entering each layer (train)"] == [r"^tokens/text/layer_\d+$"]
    # at least one picture of kept / pruned / merged patches (NLVR2: one per image of the pair)
    images = acc.Tags()["images"]
    assert "token_vis/example_0_image0" in images and "token_vis/example_0_image1" in images
    picture = acc.Images("token_vis/example_0_image0")[-1]
    assert picture.width > 3 * 96 and picture.height > 96  # input + two reduction panels
    assert any(t.startswith("token_vis/text/example_0") for t in acc.Tags()["tensors"])
    assert list((log_dir / "token_vis").glob("*.png"))
    # hyper-parameters with the final metric columns, and the resolved config next to the events
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData()
    start.ParseFromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["reducer/keep_ratio"].number_value == pytest.approx(0.7)
    assert hparams["reducer/layers"].string_value == "[1, 2]"
    experiment = plugin_data_pb2.HParamsPluginData()
    experiment.ParseFromString(content["_hparams_/experiment"])
    columns = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"val/acc", "test/acc", "val/gflops_per_example"} <= columns
    assert (log_dir / "config.yaml").is_file()


def test_keep_ratio_override_changes_the_logged_token_counts(shapes, tmp_path, vilt_run):
    cli_a, dir_a = vilt_run
    cli_b, dir_b = fit(shapes, tmp_path, "vilt_tiny", "--model.reducer.keep_ratio=0.4")
    assert cli_b.model.backbone.reducer.keep_ratio == pytest.approx(0.4)
    acc_a, acc_b = events(dir_a), events(dir_b)
    n_image = (96 // 16) ** 2 + 1
    for cli, acc in ((cli_a, acc_a), (cli_b, acc_b)):
        schedule: ReducerSchedule = cli.model.backbone.reducer
        expected, _ = schedule.tokens_per_layer(n_image, 16, cli.model.backbone.num_layers)
        logged = [scalar(acc, f"tokens/image/layer_{i:02d}")[-1] for i in range(len(expected))]
        assert logged == pytest.approx(expected)
        val = [scalar(acc, f"val/tokens/image/layer_{i:02d}")[-1] for i in range(len(expected))]
        assert val == pytest.approx(expected)
    a3 = scalar(acc_a, "tokens/image/layer_03")[-1]
    b3 = scalar(acc_b, "tokens/image/layer_03")[-1]
    assert b3 < a3  # keeping 40% instead of 70% leaves fewer tokens for the last block
    assert scalar(acc_a, "tokens/image/layer_00")[-1] == scalar(acc_b, "tokens/image/layer_00")[-1] == n_image
    # the run's saved config records the override
    saved = (dir_b / "config.yaml").read_text()
    assert "keep_ratio: 0.4" in saved


def test_hparams_file_and_config_agree(vilt_run):
    _, log_dir = vilt_run
    saved = (log_dir / "config.yaml").read_text()
    assert "class_path: pumer_lightning.tasks.NLVR2Task" in saved
    assert json.dumps(0.7) in saved or "keep_ratio: 0.7" in saved
