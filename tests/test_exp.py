"""``make exp``'s starting weights: the demo's pre-trained checkpoint is found from its configuration, made once by
the ordinary command line, reused after, and named in the summary with how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pumer_test_utils import BASE, DEMO, EXPERIMENTS

from pumer_lightning.tasks.pretrain import (
    MADE_BY,
    configured_value,
    ensure_pretrained,
    pretrain_key,
    starting_weights,
)

PRETRAIN = EXPERIMENTS / "shapes_pretrain.yaml"
CHECKPOINT = "model.init_args.backbone.checkpoint"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose 10-100x to them when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_configured_checkpoint_follows_interpolations_and_overrides():
    files = [str(BASE), str(DEMO)]
    assert configured_value(files, [], CHECKPOINT) == "data/shapes/pretrained/shapes_pretrain"
    moved = ["--data_root=/mnt/x", "--model=pumer_lightning.tasks.NLVR2Task"]  # a class override is no value
    assert configured_value(files, moved, CHECKPOINT) == "/mnt/x/shapes/pretrained/shapes_pretrain"
    assert configured_value(files, ["--model.backbone.checkpoint=null"], CHECKPOINT) is None
    assert configured_value(files, ["--model.init_args.backbone.checkpoint=/w"], CHECKPOINT) == "/w"
    assert configured_value(files, [], "model.init_args.reducer.layers") == [1, 2]


def test_only_a_pretrained_dir_named_after_an_experiment_is_made(tmp_path):
    files = [str(BASE), str(DEMO)]
    assert starting_weights(files, ["--model.backbone.checkpoint=null"]) is None
    assert starting_weights(files, [f"--model.backbone.checkpoint={tmp_path}/converted/vilt"]) is None
    assert starting_weights(files, [f"--model.backbone.checkpoint={tmp_path}/pretrained/no_such_exp"]) is None


def test_the_key_changes_with_the_config_files_and_the_overrides(tmp_path):
    edited = tmp_path / "shapes_pretrain.yaml"
    edited.write_text(PRETRAIN.read_text().replace("mlm_prob: 0.15", "mlm_prob: 0.2"))
    key = pretrain_key([BASE, PRETRAIN], ["--data_root=data"])
    assert key == pretrain_key([BASE, PRETRAIN], ["--data_root=data"])
    assert key != pretrain_key([BASE, edited], ["--data_root=data"])
    assert key != pretrain_key([BASE, PRETRAIN], ["--data_root=elsewhere"])


def _tiny(shapes: Path, out: Path) -> list[str]:
    """Overrides that shrink the pre-training experiment to a few steps on the session's shapes world."""
    return [
        f"--data_root={out}",
        "--shapes=null",
        "--model.backbone.preset=vilt_tiny",
        f"--model.backbone.tokenizer={shapes / 'tokenizer'}",
        f"--data.data_dir={shapes / 'retrieval'}",
        "--data.batch_size=16",
        "--data.eval_batch_size=8",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={out}/runs",
        f"--trainer.logger.init_args.save_dir={out}/runs",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
    ]


@pytest.fixture(scope="module")
def made(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_pretrained")
    target = out / "shapes" / "pretrained" / "shapes_pretrain"
    first = ensure_pretrained([BASE, PRETRAIN], target, _tiny(shapes, out))
    return out, target, first


def test_made_once_by_the_command_line_then_reused(made, shapes):
    out, target, first = made
    assert first.made_now and first.path == target
    assert first.command.startswith("python -m pumer_lightning fit -c ") and str(PRETRAIN) in first.command
    assert first.figures["objectives"] == "itm+mlm" and first.figures["steps"] == 6
    record = json.loads((target / MADE_BY).read_text())
    assert record["key"] == first.key and record["command"] == first.command
    weights = (target / "model.safetensors").stat().st_mtime_ns
    again = ensure_pretrained([BASE, PRETRAIN], target, _tiny(shapes, out))
    assert not again.made_now and again.key == first.key and again.figures == first.figures
    assert (target / "model.safetensors").stat().st_mtime_ns == weights  # nothing was re-run


def test_make_exp_fine_tunes_from_the_cached_checkpoint_and_says_so(made, tmp_path, monkeypatch):
    """The demo, as ``make exp`` runs it, with its checkpoint already made: the summary names the recipe."""
    from pumer_lightning.exp import run

    out, target, first = made
    # the record make exp looks for: what `python -m pumer_lightning.exp shapes_vilt --data_root=OUT` would run
    key = pretrain_key([BASE, PRETRAIN], [f"--data_root={out}", str(target)])
    (target / MADE_BY).write_text(json.dumps({"key": key, "command": first.command, "seconds": 1.0}))
    monkeypatch.chdir(tmp_path)
    text = run(
        [
            "shapes_vilt",
            "--timing-batches=1",
            "--timing-rounds=1",
            "--full-size=none",
            "--no-controls",
            f"--data_root={out}",
            "--shapes.num_train=96",
            "--shapes.num_val=24",
            "--shapes.num_test=24",
            "--shapes.workers=1",
            "--model.backbone.preset=vilt_tiny",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--data.num_workers=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={tmp_path}/runs",
            f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        ]
    )
    assert f"- recipe: fine-tuned from the pre-trained checkpoint `{target}` (itm+mlm on captions" in text
    assert "6 steps" in text and f"made by `{first.command}`, cached)" in text
    assert "reducers on during fine-tuning" in text and "(pre-training included)" not in text
