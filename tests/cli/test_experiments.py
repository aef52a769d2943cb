"""Every experiment YAML parses, carries the released PuMer setting, and fits 2 steps with a tiny backbone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pumer_test_utils import BASE, EXPERIMENTS, SHAPES_VQA_ANSWERS, TASK_CLASS

from pumer_lightning.cli import PumerCLI, missing_inputs
from pumer_lightning.reduce.released import RELEASED

REAL = sorted(
    p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "base" and not p.stem.startswith("shapes")
)
ALL = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "base")
TASK_OF = {"vqa2": "vqa2", "nlvr2": "nlvr2", "snli_ve": "snli_ve", "flickr30k": "retrieval"}


def test_the_experiment_grid_is_complete():
    expected = {f"{t}_{b}" for t in ("vqa2", "nlvr2", "snli_ve", "flickr30k") for b in ("vilt", "meter")}
    assert expected <= set(REAL)
    assert {"shapes_vilt", "shapes_meter"} <= set(ALL)


def _parse(name: str, *extra: str):
    cli = PumerCLI(args=["-c", str(BASE), "-c", str(EXPERIMENTS / f"{name}.yaml"), *extra], run=False)
    return cli


@pytest.mark.parametrize("name", REAL)
def test_real_experiment_holds_the_released_setting(name):
    """The YAML's reducer equals PuMer's released checkpoint setting, in real block ids (docs/experiments.md)."""
    raw = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
    task, family = name.rsplit("_", 1)
    model = raw["model"]
    assert model["class_path"] == TASK_CLASS[TASK_OF[task]]
    reducer = model["init_args"]["reducer"]
    key = f"{family}_{task}"
    if key in RELEASED:  # retrieval has no released setting
        schedule = RELEASED[key].schedule
        assert reducer["layers"] == schedule.layers
        assert reducer["keep_ratio"] == pytest.approx(schedule.keep_ratio)
        assert reducer["merge_ratio"] == pytest.approx(schedule.merge_ratio)
        assert reducer["text_merge_ratio"] == pytest.approx(schedule.text_merge_ratio)
    preset = model["init_args"]["backbone"]["preset"]
    assert preset.startswith(family)


#: Depth of the tiny presets' reducible stack (ViLT layers, METER co-attention blocks).
TINY_DEPTH = {"vilt": 4, "meter": 3}


def _tiny_layers(layers: list[int], family: str) -> list[int]:
    """The experiment's reduction blocks that exist in the tiny preset (blocks 1 and 2 when none does)."""
    return [i for i in layers if i < TINY_DEPTH[family]] or [1, 2]


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose 10-100x to them when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ALL)
def test_every_experiment_fits_two_steps_on_a_tiny_backbone(name, shapes, tmp_path):
    """Each experiment YAML, as the real CLI reads it, fits 2 steps (and validates 2 batches) with its family's
    tiny preset on the session's shapes shards: its task, recipe and reduction ratios are kept, only the size
    of the model, the data and the batches change."""
    raw = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
    task = raw["data"]["task"]
    family = raw["model"]["init_args"]["backbone"]["preset"].split("_")[0]
    task_class = raw["model"]["class_path"]  # the task's own class, or pre-training on its data
    assert task_class in (TASK_CLASS[task], "pumer_lightning.tasks.PretrainTask")
    reducer = raw["model"]["init_args"]["reducer"]
    layers = _tiny_layers(reducer["layers"], family)
    extra = [
        f"--data_root={tmp_path}",
        "--shapes=null",  # the shapes demos would generate their own 24,000-question world
        f"--model.backbone.preset={family}_tiny",
        "--model.backbone.checkpoint=null",
        f"--model.backbone.tokenizer={shapes / 'tokenizer'}",
        f"--model.reducer.layers={layers}",
        f"--data.data_dir={shapes / task}",
        "--data.batch_size=4",
        "--data.eval_batch_size=4",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.fast_dev_run=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    if task == "vqa2":
        extra.append(f"--model.init_args.num_answers={SHAPES_VQA_ANSWERS}")
    if task_class == TASK_CLASS["retrieval"]:  # 15 negatives per caption would score 64 pairs per step
        extra.append("--model.init_args.num_negatives=3")
    cli = PumerCLI(args=["fit", "-c", str(BASE), "-c", str(EXPERIMENTS / f"{name}.yaml"), *extra])
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.state.finished and trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert type(model).__name__ == task_class.rsplit(".", 1)[1]
    assert model.backbone.family == family and dm.task == task
    # the experiment's own ratios survive the substitution of the backbone
    assert model.backbone.reducer.layers == layers
    assert model.backbone.reducer.keep_ratio == pytest.approx(reducer["keep_ratio"])
    assert model.backbone.reducer.merge_ratio == pytest.approx(reducer["merge_ratio"])
    assert model.backbone.reducer.text_merge_ratio == pytest.approx(reducer["text_merge_ratio"])
    # linked from the backbone: image geometry and normalisation of the tiny preset's family
    expected_mean = (0.48145466, 0.4578275, 0.40821073) if family == "meter" else (0.5, 0.5, 0.5)
    assert tuple(dm.hparams.image_mean) == pytest.approx(expected_mean)
    assert dm.hparams.image_size == 96
    assert dm.hparams.tokenizer == str(shapes / "tokenizer")
    # the recipe's knobs are the experiment's
    optim = raw["model"]["init_args"]["optim"]
    assert model.optim.lr == pytest.approx(optim["lr"])
    assert model.optim.betas == pytest.approx((0.9, 0.98))
    assert model.optim.warmup_ratio == pytest.approx(optim.get("warmup_ratio", 0.1))


@pytest.mark.parametrize("name", REAL)
def test_missing_real_inputs_stop_at_once_naming_the_command(name, tmp_path):
    with pytest.raises(SystemExit, match="cannot start") as info:
        _parse(name, f"--data_root={tmp_path / 'empty'}")
    message = str(info.value)
    assert "python -m pumer_lightning.data.prepare" in message
    assert "python -m pumer_lightning.models.convert" in message
    assert str(tmp_path / "empty") in message


def test_missing_inputs_lists_every_problem(tmp_path):
    config = {
        "data": {"task": "nlvr2", "data_dir": str(tmp_path / "nlvr2")},
        "model": {
            "init_args": {
                "backbone": {
                    "preset": "meter_b16_288",
                    "tokenizer": str(tmp_path / "tok"),
                    "checkpoint": str(tmp_path / "ck"),
                },
                "distill": {"teacher": str(tmp_path / "t.ckpt")},
            }
        },
    }
    problems = missing_inputs(config)
    assert len(problems) == 4
    assert any("roberta-base" in p for p in problems)
    assert any("convert meter" in p for p in problems)
    assert any("--model.reducer.layers=[]" in p for p in problems)


@pytest.mark.parametrize("name", ALL)
def test_print_config_and_baseline_override(name, capsys):
    with pytest.raises(SystemExit):
        PumerCLI(args=["fit", "-c", str(BASE), "-c", str(EXPERIMENTS / f"{name}.yaml"),
                       "--model.reducer.layers=[]", "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["reducer"]["layers"] == []
    assert printed["exp_name"] == name
    # linked settings are not repeated in the config
    assert "image_size" not in printed["data"] and "tokenizer" not in printed["data"]


def test_interpolation_sees_command_line_overrides(capsys):
    with pytest.raises(SystemExit):
        PumerCLI(args=["fit", "-c", str(BASE), "-c", str(EXPERIMENTS / "nlvr2_vilt.yaml"),
                       "--data_root=/mnt/elsewhere", "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["data_dir"] == str(Path("/mnt/elsewhere") / "nlvr2")
    assert printed["model"]["init_args"]["backbone"]["checkpoint"].startswith("/mnt/elsewhere/")
