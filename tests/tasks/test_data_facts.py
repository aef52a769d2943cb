"""The data module's facts handed to the task once at setup, the skip ledger as the one account of dropped
examples (the task its one reporter), and checkpoints whose hyper-parameters name the configs' old module."""

from __future__ import annotations

import io
import json

import lightning.pytorch as pl
import pytest
import torch

from pumer_lightning.data import DataFacts, VLDataModule, backbone_image_config, load_tokenizer
from pumer_lightning.data.stream import SkipLedger
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tasks import BackboneSpec, NLVR2Task, OptimConfig, VQATask

REDUCER = ReducerSchedule(layers=[1], keep_ratio=0.7, merge_ratio=0.2)


def _spec(shapes):
    return BackboneSpec("vilt_tiny", tokenizer=str(shapes / "tokenizer"))


def _data(shapes, task, **kwargs):
    image = backbone_image_config("vilt", 96)
    settings = dict(
        max_text_len=16,
        image_size=96,
        image_mean=image.mean,
        image_std=image.std,
        resize=image.resize,
        batch_size=8,
        num_workers=0,
    )
    return VLDataModule(task, str(shapes / task), str(shapes / "tokenizer"), **{**settings, **kwargs})


def _trainer(tmp_path, **kwargs):
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**settings, **kwargs})


# ---------------------------------------------------------------------------------------------- the hand-off
def test_setup_hands_the_task_the_data_modules_facts(shapes, tmp_path):
    model = NLVR2Task(backbone=_spec(shapes), reducer=REDUCER)
    assert model.data_facts == DataFacts()  # nothing known before a trainer sets the module up
    dm = _data(shapes, "nlvr2", predict_split="val")
    _trainer(tmp_path, limit_val_batches=1).validate(model, dm, verbose=False)
    facts = model.data_facts
    assert facts.task == "nlvr2" and facts.label_names == ("False", "True")
    assert dict(facts.splits) == {"val": "val", "test": "test", "predict": "val"}
    assert facts.skip_ledger is dm.skip_ledger  # the live account, not a copy of its counts
    assert facts.tokenizer_dir == shapes / "tokenizer" and facts.image_mean == (0.5, 0.5, 0.5)


def test_vqa_facts_check_the_answer_vocabulary(shapes, tmp_path):
    model = VQATask(num_answers=5, backbone=_spec(shapes), reducer=REDUCER)
    vocabulary = tuple(f"answer {i}" for i in range(7))
    with pytest.raises(
        ValueError, match=r"7 answers but --model.init_args.num_answers is 5; .*num_answers=7"
    ):
        model.use_data(DataFacts(task="vqa2", label_names=vocabulary))
    with pytest.raises(ValueError, match=r"data.task is 'nlvr2' but the model is a VQATask \('vqa2'\)"):
        model.use_data(DataFacts(task="nlvr2"))
    assert model.data_facts == DataFacts()  # refused facts are not kept
    model.use_data(DataFacts(task="vqa2", label_names=vocabulary[:5]))
    rows = [{"question_id": "7", "pred": 4}, {"question_id": "q", "pred": 0}]
    path = model.write_predictions(rows, tmp_path, "test")
    assert json.loads(path.read_text()) == [
        {"question_id": 7, "answer": "answer 4"},
        {"question_id": "q", "answer": "answer 0"},
    ]


# ---------------------------------------------------------------------------------------------- skipped examples
def test_the_ledger_counts_per_split_and_restores_in_place():
    ledger = SkipLedger()
    record = ledger.recorder("val")
    record({"decode_error": 2})
    ledger.add("train", {"bad_label": 1})
    mark = ledger.mark()
    record({"decode_error": 1, "missing_image": 3})
    ledger.add("train", {"bad_label": 5})
    assert ledger.since(mark, "val") == {"decode_error": 1, "missing_image": 3}
    assert ledger.since(mark, "train") == {"bad_label": 5} and ledger.since(mark, None) == {}
    saved = ledger.state(world_size=1, pending={"train/bad_label": 2})  # fetched, not consumed: not saved
    assert saved["skipped"] == {"val/decode_error": 3, "val/missing_image": 3, "train/bad_label": 4}
    assert saved["skipped_by_rank"] == [saved["skipped"]]
    holder = ledger  # a task holds the ledger it was handed
    ledger.restore(
        {"skipped_by_rank": [{"val/decode_error": 1}, {"val/decode_error": 9}]}, rank=1, world_size=2
    )
    assert holder.totals() == {"val/decode_error": 9}
    ledger.restore({"skipped_by_rank": [{"a/x": 1}, {"a/x": 2}, {"b/y": 4}]}, rank=0, world_size=2)
    assert ledger.totals() == {"a/x": 3, "b/y": 4}  # saved by 3 ranks, resumed on 2: rank 0 takes the sum
    ledger.restore({"skipped": {"a/x": 6}}, rank=1, world_size=2)
    assert ledger.totals() == {}  # the other ranks start from zero, so the sum over ranks stays the total


def test_fit_and_test_log_the_ledger_totals_through_the_task(shapes, tmp_path):
    """No TokenStatsCallback: the task is the one reporter of the data module's skip counts."""
    model = NLVR2Task(backbone=_spec(shapes), reducer=REDUCER, optim=OptimConfig(lr=1e-4))
    dm = _data(shapes, "nlvr2")
    dm.skip_ledger.add("train", {"decode_error": 3})
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    assert float(trainer.callback_metrics["data/skipped/train/decode_error"]) == 3.0
    dm.skip_ledger.add("test", {"bad_label": 2})
    with model.predictions_to(tmp_path / "control"):
        metrics = _trainer(tmp_path, limit_test_batches=1).test(model, dm, verbose=False)[0]
    assert metrics["data/skipped/test/bad_label"] == 2.0 and metrics["data/skipped/train/decode_error"] == 3.0
    written = tmp_path / "control" / "nlvr2_test_predictions.csv"
    assert len(written.read_text().splitlines()) == 8 and model.predictions_dir is None
    # the pass itself skipped nothing: its summary says so (the 2 counted before the pass are not its own)
    summary = json.loads(written.with_name(written.name + ".skipped.json").read_text())
    assert summary == {"stage": "test", "split": "test", "predictions": 8, "skipped_total": 0, "skipped": {}}


def test_eval_dataloader_takes_its_batch_size_explicitly(shapes):
    dm = _data(shapes, "nlvr2", eval_batch_size=8)
    dm.setup("validate")
    sizes = [len(batch["keys"]) for batch in dm.eval_dataloader("val", batch_size=3)]
    assert sizes[:3] == [3, 3, 3] and sum(sizes) == 40 and dm.eval_batch_size == 8
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        dm.eval_dataloader("val", batch_size=0)


# ---------------------------------------------------------------------------------------------- old checkpoints
def test_a_checkpoint_naming_the_configs_old_module_still_loads(shapes, tmp_path):
    """Hyper-parameters pickled before the configs left tasks/base.py name ``pumer_lightning.tasks.base``."""
    spec = BackboneSpec(
        "vilt_tiny", tokenizer=str(shapes / "tokenizer"), vocab_size=len(load_tokenizer(shapes / "tokenizer"))
    )
    model = NLVR2Task(backbone=spec, reducer=REDUCER, optim=OptimConfig(lr=3e-4))
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, _data(shapes, "nlvr2"))
    saved = tmp_path / "new.ckpt"
    trainer.save_checkpoint(saved)
    blob = io.BytesIO()
    torch.save(torch.load(saved, weights_only=False), blob, _use_new_zipfile_serialization=False)
    data = blob.getvalue()
    for module, name in (
        ("pumer_lightning.models.spec", "BackboneSpec"),
        ("pumer_lightning.tasks.config", "OptimConfig"),
    ):
        new = f"{module}\n{name}\n".encode()
        assert new in data, f"{module}.{name} not pickled by its module path"
        data = data.replace(new, f"pumer_lightning.tasks.base\n{name}\n".encode())
    old = tmp_path / "old.ckpt"
    old.write_bytes(data)
    loaded = NLVR2Task.load_from_checkpoint(old, weights_only=False)
    assert loaded.spec == spec and loaded.optim == OptimConfig(lr=3e-4)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
