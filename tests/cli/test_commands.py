"""The CLI as a user types it: interpolated paths, the shapes section, fit then test --ckpt_path with overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pumer_test_utils import BASE, DEMO

from pumer_lightning.cli import PumerCLI

SMALL = ("--shapes.num_train=96", "--shapes.num_val=24", "--shapes.num_test=24", "--shapes.workers=1")


def test_demo_config_generates_its_data_fits_and_tests_a_checkpoint_with_another_schedule(tmp_path):
    common = ["-c", str(BASE), "-c", str(DEMO), f"--data_root={tmp_path}", *SMALL, "--model.backbone.checkpoint=null",
              f"--trainer.default_root_dir={tmp_path}/runs", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
              "--data.num_workers=0", "--trainer.enable_progress_bar=false"]  # fmt: skip
    fit = PumerCLI(args=["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"])
    # the shapes section generated the data under ${data_root}; the tokenizer path was interpolated and linked
    spec = json.loads((tmp_path / "shapes_demo" / "shapes.json").read_text())
    assert spec["num_train"] == 96 and spec["world"]["max_objects"] == 3
    assert fit.datamodule.tokenizer_dir == tmp_path / "shapes_demo" / "tokenizer"
    assert fit.model.backbone.image_size == 96 and fit.datamodule.hparams.image_size == 96
    best = fit.trainer.checkpoint_callback.best_model_path
    assert Path(best).is_file()
    # test the trained weights with a harsher schedule: the command line wins over the checkpoint's hparams
    test = PumerCLI(args=["test", *common, f"--ckpt_path={best}", "--model.reducer.keep_ratio=0.4"])
    assert test.model.backbone.reducer.keep_ratio == pytest.approx(0.4)
    image = [float(test.trainer.callback_metrics[f"test/tokens/image/layer_{i:02d}"]) for i in range(4)]
    expected, _ = test.model.backbone.reducer.tokens_per_layer(37, 8, 4)
    assert image == pytest.approx(expected) and image[-1] < 9  # 9 with the trained keep_ratio 0.7
    assert (Path(test.trainer.log_dir) / "config.yaml").read_text().count("keep_ratio: 0.4") == 1


def test_make_exp_driver_prints_the_summary(tmp_path, capsys):
    from pumer_lightning.exp import run

    extra = tmp_path / "tuned.yaml"  # a config layered after the experiment's, as `make tune` writes one
    extra.write_text("model:\n  init_args:\n    reducer:\n      layers: [1]\n")
    text = run([
        "shapes_vilt", "-c", str(extra), "--timing-batches=1", "--timing-rounds=1", "--full-size=none", f"--data_root={tmp_path}", *SMALL,
        "--model.backbone.checkpoint=null",  # from scratch: tests/test_exp.py covers the pre-trained start
        f"--trainer.default_root_dir={tmp_path}/runs", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--data.num_workers=0",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert "## make exp shapes_vilt: summary" in text
    assert "| test |" in text and "| image | 37.0 | 37.0 | 19.0 | 19.0 |" in text
    assert "Measured speed-up:" in text and "FLOP ratio" in text
    assert "| reducers off |" in text and "| random pruning |" in text
    assert "What this demo shows" in text and "What it does not show" in text
    written = list((tmp_path / "runs" / "shapes_vilt").glob("version_*/summary.md"))
    assert written and written[0].read_text().strip() == text.strip()
    assert "summary:" in capsys.readouterr().out
    # the control runs wrote their predictions inside the run, not into the working directory
    assert list((tmp_path / "runs").rglob("controls/*/vqa2_test_answers.json"))
    assert not Path("predictions").exists()


def test_make_exp_names_a_missing_config_file(tmp_path, capsys):
    from pumer_lightning.exp import run

    with pytest.raises(SystemExit):
        run(["shapes_vilt", "-c", str(tmp_path / "nope.yaml")])
    assert f"-c/--config: no such file '{tmp_path / 'nope.yaml'}'" in capsys.readouterr().err


def test_unknown_experiment_lists_the_available_ones():
    from pumer_lightning.exp import run

    with pytest.raises(SystemExit, match="Available: .*nlvr2_vilt.*shapes_vilt"):
        run(["no_such_experiment"])


@pytest.mark.slow
def test_full_size_timing_of_the_released_vilt_setting():
    from pumer_lightning.exp import time_full_size

    out = time_full_size("vilt_vqa2", batch_size=2, rounds=1)
    assert out["preset"] == "vilt_b32" and out["schedule"].layers == [2, 5, 8]
    assert out["image_tokens"][0] == 145 and out["image_tokens"][-1] == 31
    assert out["reduced_per_sec"] > 0 and out["unreduced_per_sec"] > 0
