"""`pumer_lightning.lab.score` and `pumer_lightning.lab.compare` on a real tiny task module built by the CLI
(`pumer_lightning.lab.context.build_cli`) over the session's shapes shards."""

from __future__ import annotations

import sys

import pytest
import torch
from pumer_test_utils import run_args

from pumer_lightning.lab.compare import compare_schedules
from pumer_lightning.lab.context import build_cli, to_device
from pumer_lightning.lab.score import Batches, Scorer, example_losses, example_scores
from pumer_lightning.measure import count_flops
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tasks.metrics import VQAScore

PUMER = ReducerSchedule(layers=[1, 2], keep_ratio=0.5, merge_ratio=0.2, text_merge_ratio=0.2)


@pytest.fixture(scope="module")
def cli(shapes, tmp_path_factory, monkeypatch_module):
    """The NLVR2 ``vilt_tiny`` experiment as the CLI builds it, with a command line of the process's own in
    ``sys.argv`` (as ``make tune`` has)."""
    monkeypatch_module.setattr(sys, "argv", ["python -m pumer_lightning.tune", "--max-drop", "2"])
    args = run_args("nlvr2", "vilt_tiny", shapes, tmp_path_factory.mktemp("lab_runs"))
    files = [args[i + 1] for i in range(0, len(args), 2) if args[i] == "-c"]
    return build_cli(files, [a for a in args if a.startswith("--")])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_build_cli_leaves_sys_argv_alone_and_warns_nothing(shapes, tmp_path, recwarn):
    argv = ["python -m pumer_lightning.study", "--budget", "quick"]
    sys_argv, sys.argv = sys.argv, list(argv)
    try:
        args = run_args("vqa2", "vilt_tiny", shapes, tmp_path)
        files = [args[i + 1] for i in range(0, len(args), 2) if args[i] == "-c"]
        built = build_cli(files, [a for a in args if a.startswith("--")])
        assert sys.argv == argv
    finally:
        sys.argv = sys_argv
    assert built.model.task_name == "vqa2" and built.model.spec.preset == "vilt_tiny"
    assert not [w for w in recwarn if "LightningCLI's args" in str(w.message)]


def test_the_scores_reproduce_the_tasks_metric_in_the_examples_order(cli):
    model, dm = cli.model, cli.datamodule
    scorer = Scorer(torch.device("cpu"))
    out = scorer.score(model, dm, dm.val_split, Batches(lambda: dm.eval_dataloader(dm.val_split), 3), None)
    assert out.metric == "val/acc" and len(out.scores) == len(out.losses) == len(out.types) == 24
    assert out.value == pytest.approx(sum(out.scores) / 24, abs=1e-6)
    expected = [m["statement_type"] for b in list(dm.eval_dataloader(dm.val_split))[:3] for m in b["meta"]]
    assert out.types == expected and all(x > 0 for x in out.losses)
    # random pruning draws from the seeded global generator: the same scores twice, and the reducer restored
    random = ReducerSchedule(layers=[0], keep_ratio=0.3, importance="random")
    batches = list(dm.eval_dataloader(dm.val_split))
    first = scorer.score(model, dm, dm.val_split, batches, random, seed=3)
    second = scorer.score(model, dm, dm.val_split, batches, random, seed=3)
    assert first.losses == second.losses and len(first.scores) == 40
    assert model.backbone.reducer == cli.model.backbone.reducer and scorer.evaluations == 3


def test_compare_counts_flops_and_times_every_schedule_against_the_reference(cli):
    model = cli.model.eval()
    dm = cli.datamodule
    batches = [to_device(b, torch.device("cpu")) for b in list(dm.eval_dataloader(dm.val_split))[:2]]
    figures = compare_schedules(model, batches, {"off": None, "pumer": PUMER}, 2, warmup=0, reference="off")
    assert figures["off"]["speedup"] == 1.0 and figures["pumer"]["speedup"] > 0
    assert figures["off"]["examples"] == 16 and figures["pumer"]["rounds"] == 2
    with torch.inference_mode(), model.backbone.using(PUMER):
        direct = count_flops(lambda: model(batches[0])) / 8
    assert figures["pumer"]["gflops_per_example"] == pytest.approx(direct / 1e9)
    assert figures["pumer"]["gflops_per_example"] < figures["off"]["gflops_per_example"]
    with pytest.raises(ValueError, match="reference 'base' is not among"):
        compare_schedules(model, batches, {"off": None}, 1, reference="base")


def test_flop_counting_and_scoring_run_the_forwards_eagerly(cli, monkeypatch):
    """A CUDA-graph replay dispatches no operator a FLOP counter could see: the FLOP count of every schedule and
    the scoring run inside the task's ``eager_forwards``."""
    model, dm = cli.model.eval(), cli.datamodule
    entered, own = [], model.eager_forwards

    def counted():
        entered.append(True)
        return own()

    monkeypatch.setattr(model, "eager_forwards", counted)
    batches = [to_device(b, torch.device("cpu")) for b in list(dm.eval_dataloader(dm.val_split))[:1]]
    compare_schedules(model, batches, {"off": None, "pumer": PUMER}, 1, warmup=0)
    assert len(entered) == 2
    Scorer(torch.device("cpu")).score(model, dm, dm.val_split, batches, None)
    assert len(entered) == 3


def test_example_scores_reproduce_the_task_metrics():
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 6), torch.rand(50, 6).round(decimals=1)
    metric = VQAScore()
    metric.update(logits, targets)
    assert float(example_scores(logits, targets).mean()) == pytest.approx(float(metric.compute()), abs=1e-6)
    labels = torch.randint(0, 2, (50,))
    right = example_scores(logits[:, :2], labels)
    assert right.tolist() == (logits[:, :2].argmax(-1) == labels).float().tolist()


def test_example_losses_average_to_the_tasks_training_loss():
    """The per-example losses are the terms of the loss the tasks minimise (NLVR2 and VQA)."""
    from pumer_lightning.tasks.classify import ClassificationTask
    from pumer_lightning.tasks.vqa import VQATask

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(6, 2, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    ce = ClassificationTask.task_loss(None, logits, {"labels": ids})
    assert example_losses(logits, ids).mean().item() == pytest.approx(ce.item())
    vqa_logits, soft = torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g)
    bce = VQATask.task_loss(None, vqa_logits, {"labels": soft})
    assert example_losses(vqa_logits, soft).mean().item() == pytest.approx(bce.item())
    assert example_losses(vqa_logits, soft).shape == (6,)
