"""VLDataModule on the shapes world: the batch contract of every task, retrieval evaluation, Lightning."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from data_helpers import image_bytes, record, write_split
from PIL import Image

from pumer_lightning.data import VLDataModule, backbone_image_config
from pumer_lightning.data.shapes import VQA_ANSWERS


def make(root, task, **kw):
    args = dict(task=task, data_dir=str(root / task), tokenizer=str(root / "tokenizer"), image_size=64,
                batch_size=8, eval_batch_size=7, num_workers=0, shuffle_buffer=16)  # fmt: skip
    args.update(kw)
    return VLDataModule(**args)


@pytest.mark.parametrize("task", ["nlvr2", "vqa2", "snli_ve", "retrieval"])
def test_batch_contract(tiny_shapes, task):
    dm = make(tiny_shapes, task, max_text_len=12)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    n_images = 2 if task == "nlvr2" else 1
    assert batch["pixel_values"].shape == (8, n_images, 3, 64, 64)
    assert batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    L = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, L) and L <= 12
    assert batch["attention_mask"][:, -1].any() and batch["input_ids"].dtype == torch.int64
    assert len(batch["keys"]) == len(batch["meta"]) == 8 and len(set(batch["keys"])) == 8
    assert all("statement_type" in m and m["text"] for m in batch["meta"])
    if task == "nlvr2":
        assert batch["labels"].dtype == torch.int64 and set(batch["labels"].tolist()) <= {0, 1}
        assert dm.num_labels == 2 and dm.label_names == ["False", "True"]
    elif task == "snli_ve":
        assert set(batch["labels"].tolist()) <= {0, 1, 2} and dm.label_names[2] == "entailment"
        for label, m in zip(batch["labels"].tolist(), batch["meta"]):
            assert (label == 1) == (m["statement_type"] == "neutral")
    elif task == "vqa2":
        assert batch["labels"].shape == (8, len(VQA_ANSWERS)) and batch["labels"].dtype == torch.float32
        assert dm.num_answers == len(VQA_ANSWERS) and dm.label_names == VQA_ANSWERS
        for row, m in zip(batch["labels"], batch["meta"]):
            assert row.argmax().item() == VQA_ANSWERS.index(m["answer"]) or row.max() < 1.0
            assert isinstance(m["question_id"], int)
    else:
        assert "labels" not in batch and batch["image_ids"].dtype == torch.int64
        assert [m["image_index"] for m in batch["meta"]] == batch["image_ids"].tolist()


@pytest.mark.parametrize("task", ["nlvr2", "vqa2", "snli_ve"])
def test_val_and_test_are_exact(tiny_shapes, task):
    dm = make(tiny_shapes, task, num_workers=2)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        keys = [k for b in loader for k in b["keys"]]
        assert len(keys) == len(set(keys)) == dm.split_meta(split).num_samples
    assert [k for b in dm.predict_dataloader() for k in b["keys"]][:3] == keys[:3]


def test_retrieval_evaluation_api(tiny_shapes):
    dm = make(tiny_shapes, "retrieval", num_workers=2)
    texts = dm.retrieval_texts("val")
    meta = dm.split_meta("val")
    assert len(texts) == meta.num_samples == 45 and len(texts.all_image_ids) == meta.num_records == 9
    assert set(texts.image_ids.tolist()) == set(texts.all_image_ids.tolist())
    # images stream exactly once, with the ids the captions point to
    image_batches = list(dm.val_dataloader())
    ids = torch.cat([b["image_ids"] for b in image_batches])
    assert sorted(ids.tolist()) == texts.all_image_ids.tolist()
    assert all("input_ids" not in b and b["pixel_values"].shape[1:] == (1, 3, 64, 64) for b in image_batches)
    # fill the N_img x N_text matrix chunk by chunk with an oracle score: recall@1 must then be 1
    row = {int(i): r for r, i in enumerate(texts.all_image_ids)}
    scores = torch.full((len(texts.all_image_ids), len(texts)), float("nan"))
    for b in image_batches:
        for chunk in texts.batches(16):
            assert chunk["input_ids"].shape[0] <= 16
            s = (b["image_ids"][:, None] == chunk["image_ids"][None, :]).float()
            scores[
                [row[int(i)] for i in b["image_ids"]], chunk["text_index"][0] : chunk["text_index"][-1] + 1
            ] = s
    assert not scores.isnan().any()
    positives = texts.image_ids[None, :] == texts.all_image_ids[:, None]
    assert positives.sum() == len(texts) and (scores == positives.float()).all()
    with pytest.raises(ValueError, match="retrieval"):
        make(tiny_shapes, "nlvr2").retrieval_texts()


def test_concatenated_train_splits(tiny_shapes):
    dm = make(tiny_shapes, "snli_ve", train_split=["train", "val"])
    assert dm.num_train_samples == 120 + 45
    assert dm.steps_per_epoch() == 165 // 8 and dm.steps_per_epoch(world_size=4) == 165 // 32
    keys = [k for b in dm.train_dataloader() for k in b["keys"]]
    assert len(keys) == 8 * 20 and any("-val-" in k for k in keys) and any("-train-" in k for k in keys)


def test_shorter_side_batches_carry_a_pixel_mask(tmp_path, tokenizer_dir):
    recs = [
        record(f"r{i}", [{"text_id": f"r{i}-0", "text": "a circle", "label": "neutral"}],
               [image_bytes((9, 9, 9), (40, 30) if i % 2 else (30, 40))])
        for i in range(4)
    ]  # fmt: skip
    write_split(tmp_path / "val", "snli_ve", recs, [4], split="val")
    dm = VLDataModule(task="snli_ve", data_dir=str(tmp_path), tokenizer=str(tokenizer_dir), image_size=32,
                      resize="shorter_side", pad_multiple=8, eval_batch_size=4, num_workers=0)  # fmt: skip
    (batch,) = list(dm.val_dataloader())
    assert batch["pixel_values"].shape == (4, 1, 3, 40, 40) and batch["pixel_mask"].shape == (4, 1, 40, 40)
    mask = batch["pixel_mask"][:, 0]  # portrait 30x40 -> 32 wide x 40 high; landscape 40x30 -> 40 x 32
    assert mask[0, :, :32].all() and not mask[0, :, 32:].any()
    assert mask[1, :32, :].all() and not mask[1, 32:, :].any()


def test_clip_preset_and_float_transfer(tiny_shapes):
    cfg = backbone_image_config("clip", 32)
    dm = make(tiny_shapes, "vqa2", image_size=cfg.image_size, image_mean=cfg.mean, image_std=cfg.std,
              resize=cfg.resize, uint8_transfer=False)  # fmt: skip
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (7, 1, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    # the same pixels computed by hand from the stored JPEG: PIL bicubic resize, CLIP mean/std
    m = batch["meta"][0]
    with tarfile.open(tiny_shapes / "vqa2" / "val" / m["shard"]) as tar:
        data = tar.extractfile(f"{m['record_key']}.img0.jpg").read()
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
    want = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    assert torch.allclose(batch["pixel_values"][0, 0], want, atol=1e-5)


class _Recorder(pl.LightningModule):
    """Minimal model: one parameter, records what the loops hand it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_batches, self.val_keys, self.dtypes, self.epoch_keys = 0, [], set(), []

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        self.dtypes.add(batch["pixel_values"].dtype)
        self.epoch_keys.append(tuple(batch["keys"]))
        return (self.w * batch["pixel_values"].mean()).sum() + self.w.square().sum()

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["keys"]
        self.dtypes.add(batch["pixel_values"].dtype)

    def on_train_end(self):
        # a loader iterated by hand inside the module (as retrieval re-ranking does) is normalised too
        batch = next(iter(self.trainer.datamodule.eval_dataloader("val")))
        self.dtypes.add(batch["pixel_values"].dtype)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_uses_the_datamodule(tiny_shapes):
    dm = make(tiny_shapes, "nlvr2", num_workers=1, persistent_workers=True)
    model = _Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.train_batches == 2 * dm.steps_per_epoch() == 2 * 15
    assert trainer.num_training_batches == 15 and trainer.estimated_stepping_batches == 30
    assert model.dtypes == {torch.float32}  # uint8 from the workers, normalised after the device transfer
    assert dm.val_dataloader().postprocess is None  # what the trainer gets: normalised on the device
    assert Counter(model.val_keys).most_common(1)[0][1] == 2 and len(set(model.val_keys)) == 45
    assert model.epoch_keys[:15] != model.epoch_keys[15:]
    assert dm.skipped == {}


def test_lightning_cli_builds_the_datamodule_from_yaml(tiny_shapes, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["pumer_lightning"])
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        f"data:\n  task: vqa2\n  data_dir: {tiny_shapes / 'vqa2'}\n  tokenizer: {tiny_shapes / 'tokenizer'}\n"
        "  image_size: 32\n  image_mean: [0.48145466, 0.4578275, 0.40821073]\n  resize: square_bicubic\n"
        "  train_split: [train, val]\n  max_text_len: 16\n"
    )
    args = ["--config", str(cfg), "--data.batch_size=5"]
    cli = LightningCLI(_Recorder, VLDataModule, run=False, args=args, seed_everything_default=False)
    dm = cli.datamodule
    assert (dm.task, dm.batch_size, dm.max_text_len, dm.train_splits) == ("vqa2", 5, 16, ["train", "val"])
    assert (
        dm.eval_transform.mean == (0.48145466, 0.4578275, 0.40821073)
        and dm.eval_transform.resize == "square_bicubic"
    )
    assert dm.num_train_samples == 165


def test_teardown_stops_every_loaders_workers(tiny_shapes):
    """Persistent workers stop when the data module is torn down (Lightning calls teardown after each run), not
    whenever the garbage collector reaches the loader; a loader stays usable after it."""
    import multiprocessing

    dm = make(tiny_shapes, "vqa2", num_workers=2)
    before = set(multiprocessing.active_children())
    loaders = [dm.val_dataloader(), dm.eval_dataloader("test", batch_size=5)]
    first = [[k for b in loader for k in b["keys"]] for loader in loaders]
    assert len(set(multiprocessing.active_children()) - before) == 4  # 2 persistent workers per loader
    dm.teardown("validate")
    assert set(multiprocessing.active_children()) - before == set()
    assert [k for b in loaders[0] for k in b["keys"]] == first[0]  # a new pass starts new workers
    dm.teardown("validate")
