"""The training recipe: parameter groups, schedule, VQA loss scale, distillation, seeding, clear errors."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from pumer_lightning.data import VLDataModule, backbone_image_config, load_tokenizer
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tasks import (
    BackboneSpec,
    DistillConfig,
    NLVR2Task,
    OptimConfig,
    SNLIVETask,
    VQATask,
    no_decay_names,
    warmup_decay,
)

REDUCER = ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2, text_merge_ratio=0.2)


def _spec(shapes, preset="vilt_tiny"):
    return BackboneSpec(
        preset, tokenizer=str(shapes / "tokenizer"), vocab_size=len(load_tokenizer(shapes / "tokenizer"))
    )


def _data(shapes, task, preset="vilt_tiny", batch_size=8):
    image = backbone_image_config("clip" if preset.startswith("meter") else "vilt", 96)
    return VLDataModule(
        task, str(shapes / task), str(shapes / "tokenizer"), max_text_len=16, image_size=96,
        image_mean=image.mean, image_std=image.std, resize=image.resize, batch_size=batch_size,
        num_workers=0,
    )  # fmt: skip


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
def test_param_groups_multipliers_and_no_decay(preset, shapes):
    optim = OptimConfig(lr=2e-4, lr_mult_head=10, lr_mult_cross_modal=5, weight_decay=0.01)
    model = NLVR2Task(backbone=_spec(shapes, preset), reducer=REDUCER, optim=optim)
    groups = {g["name"]: g for g in model.param_groups()}
    names = {id(p): n for n, p in model.named_parameters()}
    # every trainable parameter in exactly one group
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert groups["head"]["lr"] == pytest.approx(2e-3) and groups["backbone"]["lr"] == pytest.approx(2e-4)
    if preset == "meter_tiny":
        assert groups["cross_modal"]["lr"] == pytest.approx(1e-3)
        assert all(".cross_modal" in "." + names[id(p)] for p in groups["cross_modal"]["params"])
    else:
        assert "cross_modal" not in groups  # ViLT has no cross-modal parameters
    for name, group in groups.items():
        decayed = not name.endswith("/no_decay")
        assert group["weight_decay"] == (0.01 if decayed else 0.0)
        for p in group["params"]:
            n = names[id(p)]
            is_norm_or_bias = n.endswith("bias") or any(
                isinstance(m, nn.LayerNorm) and p is m.weight for m in model.modules()
            )
            assert is_norm_or_bias == (not decayed), n
    assert "1.weight" in no_decay_names(model.head)  # the head's LayerNorm


def test_warmup_then_linear_decay():
    total, warmup = 100, 10
    values = [warmup_decay(s, total, warmup) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert warmup_decay(99, total, warmup, "linear", end_ratio=0.2) == pytest.approx(0.2 + 0.8 / 90)
    assert warmup_decay(55, total, warmup, "cosine") == pytest.approx(0.5)


def test_schedule_is_sized_from_the_epoch_length(shapes, tmp_path):
    """96 training examples / batch 8 = 12 steps per epoch, 2 epochs: warmup 10% = 2 steps, then linear decay."""
    model = SNLIVETask(backbone=_spec(shapes), reducer=REDUCER, optim=OptimConfig(lr=1e-3, lr_mult_head=1))
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(model, _data(shapes, "snli_ve"))
    assert trainer.estimated_stepping_batches == 24 and len(lrs) == 24
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * 1 / 22)


def test_vqa_loss_is_bce_times_answers_and_distils_with_sigmoids(shapes):
    model = VQATask(num_answers=5, backbone=_spec(shapes), reducer=REDUCER)
    logits = torch.randn(4, 5)
    targets = torch.rand(4, 5)
    expected = (
        sum(
            -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x))).item()
            for x, t in zip(logits.flatten(), targets.flatten())
        )
        / 4
    )  # summed over answers, averaged over questions
    assert model.task_loss(logits, {"labels": targets}).item() == pytest.approx(expected, rel=1e-5)
    # sigmoid/BCE distillation: zero gradient exactly where the student equals the teacher, per answer
    student = logits.clone().requires_grad_(True)
    model.distill = DistillConfig(teacher="initial", temperature=2.0)
    model.distill_loss(student, logits.clone()).backward()
    assert student.grad.abs().max().item() < 1e-7
    # ... and, unlike a softmax KL, it sees a shift of every logit (multi-label answers are independent)
    shifted = model.distill_loss(logits + 3.0, logits)
    assert shifted.item() > 0.1


def test_distillation_from_a_frozen_copy_of_the_start(shapes, tmp_path):
    model = NLVR2Task(
        backbone=_spec(shapes), reducer=REDUCER, distill=DistillConfig(teacher="initial", weight=0.5)
    )
    start = copy.deepcopy(model.state_dict())
    assert model.teacher["backbone"].reducer is None  # the teacher is the unreduced model
    assert all(not p.requires_grad for p in model.teacher.parameters())
    seen = {}

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")}
            )
            seen["teacher_mode"] = pl_module.teacher.training
            seen["tokens"], seen["batch"] = outputs["tokens"], int(batch["pixel_values"].shape[0])

    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[Capture()])
    trainer.fit(model, _data(shapes, "nlvr2"))
    after = model.state_dict()
    changed = [k for k in after if k.startswith("backbone.") and not torch.equal(after[k], start[k])]
    assert changed, "the student did not train"
    assert all(torch.equal(after[k], start[k]) for k in after if k.startswith("teacher."))
    assert seen["teacher_mode"] is False
    assert seen["train/loss"] == pytest.approx(
        seen["train/loss_task"] + 0.5 * seen["train/loss_distill"], rel=1e-4
    )
    assert seen["train/loss_distill"] > 0  # pruning makes the student differ from the unreduced teacher
    # the step returns its tokens (StepOutput): the student's two NLVR2 passes, not the teacher's
    tokens = seen["tokens"]
    assert tokens.examples == seen["batch"] and tokens.rows == 2 * seen["batch"]
    assert tokens.image[-1] < tokens.image[0]
    assert not hasattr(model, "step_tally")


def test_teacher_from_a_lightning_checkpoint(shapes, tmp_path):
    donor = NLVR2Task(backbone=_spec(shapes), reducer=ReducerSchedule())
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(donor, _data(shapes, "nlvr2"))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    student = NLVR2Task(backbone=_spec(shapes), reducer=REDUCER, distill=DistillConfig(teacher=str(path)))
    for key, value in donor.backbone.state_dict().items():
        assert torch.equal(student.teacher["backbone"].state_dict()[key], value)
    assert not torch.equal(student.backbone.embeddings.cls_token, donor.backbone.embeddings.cls_token)


def test_missing_teacher_and_checkpoint_are_errors_naming_the_fix(shapes):
    with pytest.raises(FileNotFoundError, match=r"--model.distill.teacher .*never skipped"):
        NLVR2Task(backbone=_spec(shapes), distill=DistillConfig(teacher="/nonexistent/ft.ckpt"))
    spec = _spec(shapes)
    spec.checkpoint = "/nonexistent/vilt"
    with pytest.raises(FileNotFoundError, match=r"python -m pumer_lightning.models.convert vilt"):
        NLVR2Task(backbone=spec)


def test_seeded_runs_are_identical(shapes, tmp_path):
    states = []
    for _ in range(2):
        pl.seed_everything(7, workers=True)
        model = SNLIVETask(backbone=_spec(shapes), reducer=REDUCER)
        _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, _data(shapes, "snli_ve"))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_task_and_data_must_agree(shapes, tmp_path):
    model = SNLIVETask(backbone=_spec(shapes), reducer=REDUCER)
    with pytest.raises(ValueError, match="--data.task=snli_ve"):
        _trainer(tmp_path, fast_dev_run=1).fit(model, _data(shapes, "nlvr2"))
    vqa = VQATask(num_answers=7, backbone=_spec(shapes), reducer=REDUCER)
    with pytest.raises(ValueError, match="num_answers=18"):
        _trainer(tmp_path, fast_dev_run=1).fit(vqa, _data(shapes, "vqa2"))


def test_checkpoints_record_the_architecture_and_refuse_another(shapes, tmp_path):
    """A preset edited after a checkpoint was saved (same shapes, other heads) fails loudly on every load path:
    Lightning's own loading (resume, test, predict), a distillation teacher and a converted backbone."""
    from pumer_lightning.models import CheckpointError, build_backbone, save_checkpoint

    donor = NLVR2Task(backbone=_spec(shapes), reducer=ReducerSchedule())
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(donor, _data(shapes, "nlvr2"))
    path = tmp_path / "donor.ckpt"
    trainer.save_checkpoint(path)
    blob = torch.load(path, map_location="cpu", weights_only=False)
    assert blob["backbone_architecture"] == donor.backbone.architecture
    assert blob["backbone_architecture"]["num_attention_heads"] == 2
    assert (
        NLVR2Task.load_from_checkpoint(path, weights_only=False).backbone.architecture
        == donor.backbone.architecture
    )

    blob["backbone_architecture"]["num_attention_heads"] = 4  # as if vilt_tiny had had 4 heads back then
    torch.save(blob, path)
    want = r"num_attention_heads: checkpoint 4 vs --model.backbone.preset vilt_tiny 2"
    with pytest.raises(CheckpointError, match=want):
        NLVR2Task.load_from_checkpoint(path, weights_only=False)
    with pytest.raises(
        CheckpointError, match=r"(?s)--model.distill.teacher .*num_attention_heads: checkpoint 4"
    ):
        NLVR2Task(backbone=_spec(shapes), reducer=REDUCER, distill=DistillConfig(teacher=str(path)))

    converted = save_checkpoint(tmp_path / "backbone.pt", donor.backbone, preset="vilt_tiny")
    saved = torch.load(converted, weights_only=False)
    assert saved["config"]["architecture"]["layer_norm_eps"] == donor.backbone.config.layer_norm_eps
    saved["config"]["architecture"]["layer_norm_eps"] = 1e-6
    torch.save(saved, converted)
    with pytest.raises(
        CheckpointError, match=r"layer_norm_eps: checkpoint 1e-06 vs preset 'vilt_tiny' 1e-12"
    ):
        build_backbone("vilt_tiny", converted, num_token_types=3)
    del saved["config"]["architecture"]  # saved before architectures were recorded: loads as before
    torch.save(saved, converted)
    build_backbone("vilt_tiny", converted, num_token_types=3)
