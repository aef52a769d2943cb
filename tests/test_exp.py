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
    cached = ensure_pretrained([BASE, PRETRAIN], target, _tiny(shapes, out), make=False)
    assert not cached.made_now and cached.key == first.key
    with pytest.raises(SystemExit, match="no pre-trained weights made by these settings"):
        ensure_pretrained([BASE, PRETRAIN], out / "elsewhere", _tiny(shapes, out), make=False)
    assert not (out / "elsewhere").exists()


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


# ---------------------------------------------------------------------------------------------- the summary's stages
@pytest.fixture(scope="module")
def vqa_cli(shapes, tmp_path_factory):
    """The shapes VQA ``vilt_tiny`` experiment as the CLI builds it (untrained: the figures are about shapes)."""
    from pumer_test_utils import run_args

    from pumer_lightning.lab.context import build_cli

    args = run_args("vqa2", "vilt_tiny", shapes, tmp_path_factory.mktemp("exp_runs"))
    files = [args[i + 1] for i in range(0, len(args), 2) if args[i] == "-c"]
    return build_cli(files, [a for a in args if a.startswith("--")])


def test_time_reduction_compares_the_reducers_with_none_on_the_same_batches(vqa_cli):
    from pumer_lightning.exp import _speed_lines, eval_batches, time_reduction

    model, dm = vqa_cli.model, vqa_cli.datamodule
    schedule = model.backbone.reducer
    batches = eval_batches(dm, 2)
    assert len(batches) == 2 and [b["labels"].shape[0] for b in batches] == [8, 8]
    timing = time_reduction(model, batches, rounds=1, precision="32-true")
    assert list(timing) == ["reduced", "unreduced"] and model.backbone.reducer is schedule  # restored
    reduced, unreduced = timing["reduced"], timing["unreduced"]
    assert reduced["examples"] == 16 and reduced["rounds"] == 1 and unreduced["speedup"] == 1.0
    assert 0 < reduced["gflops_per_example"] < unreduced["gflops_per_example"]
    lines = "\n".join(_speed_lines(timing))
    assert "Speed (evaluation forward, 16 test examples x 1 interleaved rounds" in lines
    assert f"| reduced | {reduced['examples_per_sec']:.1f} | {reduced['gflops_per_example']:.4f} |" in lines
    ratio = unreduced["gflops_per_example"] / reduced["gflops_per_example"]
    assert f"**Measured speed-up: {reduced['speedup']:.2f}x** (FLOP ratio {ratio:.2f}x;" in lines


def test_the_controls_write_their_predictions_in_the_run_and_restore_the_model(
    vqa_cli, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from pumer_lightning.exp import control_runs

    model = vqa_cli.model
    schedule, predictions = model.backbone.reducer, model.predictions_dir
    trainer = SimpleNamespace(accelerator="cpu", log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = control_runs(SimpleNamespace(model=model, trainer=trainer, datamodule=vqa_cli.datamodule))
    assert list(out) == ["reducers off", "random pruning"]  # keep 0.9 < 1: random pruning is a control
    assert all(0 <= metrics["test/vqa_score"] <= 1 for metrics in out.values())
    assert sorted(p.parent.name for p in tmp_path.rglob("controls/*/vqa2_test_answers.json")) == [
        "random_pruning",
        "reducers_off",
    ]
    assert model.backbone.reducer is schedule and model.predictions_dir == predictions


def test_the_accuracy_and_token_tables():
    from pumer_lightning.exp import _accuracy_lines, _token_lines

    test = {
        "test/acc": 0.75,
        "test/acc_by_type/shape": 0.5,
        "test/tokens/image/layer_00": 37.0,
        "test/tokens/image/layer_01": 19.0,
        "test/tokens/text/layer_00": 8.0,
    }
    assert _accuracy_lines("acc", {"val/acc": 0.8125}, test) == [
        "| split | acc |",
        "|---|---|",
        "| val (best checkpoint) | 81.2% |",
        "| test | 75.0% |",
        "",
        "| statement type | test acc |",
        "|---|---|",
        "| shape | 50.0% |",
        "",
    ]
    assert _accuracy_lines("acc", {}, {})[2:4] == ["| val (best checkpoint) | n/a |", "| test | n/a |"]
    assert _token_lines(test)[2:6] == [
        "| layer | 0 | 1 |",
        "|---|---|---|",
        "| image | 37.0 | 19.0 |",
        "| text | 8.0 | nan |",
    ]
    assert _token_lines({"test/acc": 0.5}) == []


def test_the_full_size_line_is_the_benchs_own_measurement(tmp_path):
    """`time_full_size` runs the bench (here on its tiny ViLT VQA experiment) and reads its record."""
    from pumer_lightning.exp import _full_size_lines, time_full_size

    full = time_full_size("tiny_vilt_vqa2", batch_size=2, rounds=1, out_dir=tmp_path)
    assert full["preset"] == "vilt_tiny" and full["schedule"].layers == [1, 2]
    record = json.loads(Path(full["record"]).read_text())
    assert [s["name"] for s in record["settings"]] == ["baseline", "pumer"]
    assert record["protocol"]["rounds"] == 1 and record["batch_size"] == 2
    pumer = record["settings"][1]
    assert full["image_tokens"] == pumer["tokens_per_layer"]["image"] and full["image_tokens"][0] == 37
    assert full["speedup"] == pumer["speedup"] and full["flops_ratio"] > 1
    line = _full_size_lines(full)[0]
    assert "measured by the bench (vilt_tiny, random weights, released `tiny_vilt_vqa2` schedule" in line
    assert (
        f"image tokens per layer {' -> '.join(str(t) for t in dict.fromkeys(full['image_tokens']))}." in line
    )
