"""Every task fits (fast_dev_run) on shapes shards with both tiny backbones, through the real CLI, and its
test/predict stage writes the prediction file of its benchmark."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from pumer_test_utils import run_args

from pumer_lightning.callbacks import TokenStatsCallback
from pumer_lightning.cli import PumerCLI

TASKS = ("nlvr2", "vqa2", "snli_ve", "retrieval")


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
@pytest.mark.parametrize("task", TASKS)
def test_fast_dev_run_fits_every_task(task, preset, shapes, tmp_path):
    cli = PumerCLI(args=["fit", *run_args(task, preset, shapes, tmp_path, "--trainer.fast_dev_run=1")])
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 1
    assert model.task_name == task and model.spec.preset == preset
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    # the reducer ran inside the backbone: fewer image tokens leave block 2 than entered block 0
    stats = next(cb for cb in trainer.callbacks if isinstance(cb, TokenStatsCallback))
    tally = stats.last_tokens  # the last step's StepOutput["tokens"], as the callback received it
    assert tally.rows > 0 and tally.image[-1] < tally.image[0]
    main = {"nlvr2": "val/acc", "snli_ve": "val/acc", "vqa2": "val/vqa_score", "retrieval": "val/ir_r1"}[task]
    assert main in trainer.callback_metrics


@pytest.mark.parametrize("task", TASKS)
def test_test_stage_writes_predictions(task, shapes, tmp_path):
    out = tmp_path / "pred"
    cli = PumerCLI(
        args=["test", *run_args(task, "vilt_tiny", shapes, tmp_path, f"--model.predictions_dir={out}")]
    )
    metrics = cli.trainer.callback_metrics
    if task == "nlvr2":
        rows = list(csv.reader((out / "nlvr2_test_predictions.csv").open()))
        assert len(rows) == 40 and {r[1] for r in rows} <= {"True", "False"}
        assert len({r[0] for r in rows}) == 40
        assert 0.0 <= float(metrics["test/consistency"]) <= 1.0
    elif task == "snli_ve":
        rows = list(csv.reader((out / "snli_ve_test_predictions.csv").open()))
        assert len(rows) == 40 and {r[1] for r in rows} <= {"contradiction", "neutral", "entailment"}
    elif task == "vqa2":
        answers = json.loads((out / "vqa2_test_answers.json").read_text())
        assert len(answers) == 40
        assert all(isinstance(a["question_id"], int) and isinstance(a["answer"], str) for a in answers)
        assert len({a["question_id"] for a in answers}) == 40
        assert {a["answer"] for a in answers} <= set(cli.datamodule.label_names)
    else:
        ranks = json.loads((out / "retrieval_test_ranks.json").read_text())
        assert len(ranks["text_retrieval"]) == 8  # 40 captions = 8 images x 5
        assert len(ranks["image_retrieval"]) == 40
        for key in ("test/tr_r1", "test/ir_r1", "test/ir_r10", "test/r_mean"):
            assert 0.0 <= float(metrics[key]) <= 1.0
        # R@10 over 8 images covers every image: image retrieval is certain
        assert float(metrics["test/ir_r10"]) == 1.0


def test_retrieval_rerank_with_the_same_schedule_reproduces_the_full_ranking(shapes, tmp_path):
    """A "cheap" first pass equal to the model's own schedule, re-scored at the top-k, changes no R@k <= k."""
    common = run_args("retrieval", "vilt_tiny", shapes, tmp_path)
    plain = PumerCLI(args=["test", *common]).trainer.callback_metrics
    first = "{layers: [1, 2], keep_ratio: 0.7, merge_ratio: 0.2, text_merge_ratio: 0.2}"
    rerank = PumerCLI(
        args=["test", *common, f"--model.init_args.rerank={{top_k: 10, first_pass: {first}}}"]
    ).trainer.callback_metrics
    for key in ("test/tr_r1", "test/tr_r5", "test/ir_r1", "test/ir_r5"):
        assert float(rerank[key]) == pytest.approx(float(plain[key]))
    assert "test/first_pass/ir_r1" in rerank


def test_vocab_follows_the_tokenizer(shapes, tmp_path):
    """The model as the CLI builds it (test_fast_dev_run_fits_every_task fits the same configuration)."""
    from pumer_lightning.data import load_tokenizer

    cli = PumerCLI(args=run_args("nlvr2", "meter_tiny", shapes, tmp_path), run=False)
    vocab = len(load_tokenizer(shapes / "tokenizer"))
    assert cli.model.spec.vocab_size is None  # not given: the tokenizer decides
    assert cli.model.backbone.text_transformer.embeddings.word_embeddings.weight.shape[0] == vocab
    assert cli.model.backbone.token_type_embeddings.weight.shape[0] == 3  # text + two NLVR2 images


@pytest.mark.parametrize("task", TASKS)
def test_test_stage_runs_in_bf16_true(task, shapes, tmp_path):
    """What the README tells CPU users to do (`test --trainer.precision bf16-true`) works for every task: the
    weights run in bf16, the metric sums stay float64."""
    cli = PumerCLI(
        args=["test", *run_args(task, "vilt_tiny", shapes, tmp_path, "--trainer.precision=bf16-true")]
    )
    assert cli.trainer.state.finished
    assert next(cli.model.backbone.parameters()).dtype == torch.bfloat16
    metrics = {
        "nlvr2": "test/acc",
        "snli_ve": "test/acc",
        "vqa2": "test/vqa_score",
        "retrieval": "test/ir_r1",
    }
    assert 0.0 <= float(cli.trainer.callback_metrics[metrics[task]]) <= 1.0
    sums = [m for m in cli.model.modules() if hasattr(m, "_defaults")]
    assert all(
        v.dtype in (torch.float64, torch.long) for m in sums for v in m.metric_state.values() if v.numel()
    )
